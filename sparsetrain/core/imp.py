"""Iterative magnitude pruning (IMP) arithmetic: how many weights survive level ``L``, and which.

Two ways to count, by ``counting``:

* ``closed_form`` (default): level ``L`` keeps ``round(N * (1 - p) ** L)`` of ``N`` weights
  (round half up), computed from the dense count, so the density after ``L`` levels is
  ``(1 - p) ** L`` within half a weight (per layer for ``layerwise``, over the pooled layers for
  ``global``).
* ``openlth`` (``facebookresearch/open_lth``, ``pruning/sparse_global.py``): each level removes
  ``ceil(p * remaining) + 1`` weights (its threshold is the ``ceil(p * remaining)``-th smallest
  ``|w|`` and it keeps the strictly larger ones). Compounded over levels this prunes more than
  the closed form: between ``sum_{j<L} (1-p)^j`` and twice that many weights more (up to
  ``1/p``, resp. ``2/p``, for many levels; 7 weights at levels 15-20 for ``p = 0.2``), on top of
  the rounding. Global pruning only.

The survivors are the largest ``|w|`` among the weights that survived level ``L - 1`` (so
masks only ever shrink).

``global`` pools all targets under one threshold (OpenLTH ``sparse_global``, the default);
``layerwise`` prunes every layer by the same fraction. ``layer_fractions`` maps globs on
target names to a layer's own fraction (first matching glob wins): those layers are pruned
layer-wise at their own rate, whatever ``pruning`` says (``0`` keeps a layer dense).
``ignore`` (globs) keeps layers dense *but counts their weights* in the pool, as OpenLTH's
``pruning_layers_to_ignore``: each level then removes ``p`` of *all* remaining weights from the
other layers (for LeNet-300-100 with its output layer ignored, level 20 leaves 2,062 hidden
weights, 0.78 %, instead of 3,058 when the output layer is simply not a target).

``structure="N:M"`` (see :mod:`sparsetrain.core.nm`): layers that fit prune with their ``N``
largest ``|w|`` of every group of ``M`` kept first, and never below ``N/M`` of their weights; so
every level keeps at least ``N`` per group and the first level whose density reaches ``N/M``
(and every later one) is exactly N:M. Under ``global`` the threshold pools only these layers; the
ones that cannot hold the structure stay dense (``indivisible="dense"``) or are pruned layer-wise
by ``fraction`` (``"unstructured"``). Groups run along each target's real input dim where ``layouts``
(:func:`~sparsetrain.core.layouts.target_layouts`) are given, with ``nm_layout`` for convolutions
(:mod:`sparsetrain.core.layouts`); without them, along the rows of ``weight.reshape(rows, -1)``.

Example::

    >>> w = {"a": torch.tensor([0.1, -0.5, 0.3, 0.0, 0.9])}
    >>> imp_masks(w, None, level=1, fraction=0.4)["a"]
    tensor([False,  True,  True, False,  True])
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.layouts import Layout, groupings
from sparsetrain.core.masks import Masks, global_topk_masks, magnitude_scores, random_scores, topk_masks
from sparsetrain.core.nm import NMStructure
from sparsetrain.core.validation import check_choice

PRUNING = ("global", "layerwise")
COUNTING = ("closed_form", "openlth")


def check_fraction(value, key: str = "prune_fraction", low_open: bool = True) -> float:
    """A pruning fraction in (0, 1) (or [0, 1) with ``low_open=False``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value < 1 if low_open else 0 <= value < 1)
    if not ok:
        allowed = "(0, 1)" if low_open else "[0, 1)"
        raise SparsityConfigError(f"{key}={value!r} must be a number in {allowed}: the fraction of the remaining weights pruned per level")
    return float(value)


def level_keep(n: int, fraction: float, level: int) -> int:
    """How many of ``n`` weights survive ``level`` levels of pruning ``fraction``: ``round(n (1 - p)^L)``."""
    return min(n, math.floor(n * (1.0 - fraction) ** level + 0.5))


def layer_fraction_map(names, layer_fractions: Mapping[str, float] | None, key: str = "layer_fractions") -> dict[str, float]:
    """Per-target fraction for every target a glob in ``layer_fractions`` names (first glob wins)."""
    out: dict[str, float] = {}
    for glob, fraction in (layer_fractions or {}).items():
        check_fraction(fraction, f"{key}[{glob!r}]", low_open=False)
        matched = [n for n in names if fnmatch.fnmatchcase(n, glob)]
        if not matched:
            raise SparsityConfigError(f"{key} glob {glob!r} matches no target; targets are: {', '.join(list(names)[:8])}")
        for n in matched:
            out.setdefault(n, float(fraction))
    return out


@torch.no_grad()
def imp_masks(
    weights: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None,
    level: int,
    fraction: float = 0.2,
    pruning: str = "global",
    layer_fractions: Mapping[str, float] | None = None,
    ignore: list[str] | None = None,
    counting: str = "closed_form",
    structure: str | None = None,
    indivisible: str = "dense",
    layouts: Mapping[str, Layout] | None = None,
    nm_layout: str = "channels",
) -> Masks:
    """Masks of level ``level`` from the trained weights and masks of level ``level - 1``."""
    check_choice(pruning, "pruning", PRUNING)
    check_choice(counting, "counting", COUNTING)
    check_choice(indivisible, "indivisible", ("dense", "unstructured", "error"))
    check_fraction(fraction)
    nm = NMStructure.parse(structure)
    if nm is not None and counting == "openlth":
        raise SparsityConfigError("counting='openlth' has no N:M structure: use counting='closed_form' with structure")
    scores = magnitude_scores(weights, masks)
    own = layer_fraction_map(list(weights), layer_fractions)
    ignored = [n for n in weights if any(fnmatch.fnmatchcase(n, g) for g in ignore or [])]
    for glob in ignore or []:
        if not any(fnmatch.fnmatchcase(n, glob) for n in weights):
            raise SparsityConfigError(f"ignore glob {glob!r} matches no target; targets are: {', '.join(list(weights)[:8])}")
    if counting == "openlth" and (pruning != "global" or own):
        raise SparsityConfigError("counting='openlth' is OpenLTH's sparse_global: use it with pruning='global' and no layer_fractions")
    structured: list[str] = []
    if nm is not None:
        free = [n for n in weights if n not in own and n not in ignored]
        read = groupings({n: tuple(weights[n].shape) for n in free}, layouts, nm_layout)
        unfit = [n for n in free if not read[n].fits(nm.m)]
        if unfit and indivisible == "error":
            raise SparsityConfigError(
                f"structure={structure!r}: {unfit[:6]} have an input size that is not a multiple of {nm.m}; allowed: "
                "indivisible='dense', 'unstructured', or exclude them from the targets"
            )
        own.update({n: 0.0 if indivisible == "dense" else fraction for n in unfit})
        structured = [n for n in free if n not in unfit]
        scores.update({n: nm.on(read[n]).protect(scores[n]) for n in structured})
    floor = {n: weights[n].numel() * nm.n // nm.m for n in structured}  # never below N/M of a structured layer
    if pruning == "layerwise":
        own.update({n: fraction for n in weights if n not in own and n not in ignored})
    keeps = {n: max(level_keep(weights[n].numel(), f, level), floor.get(n, 0)) for n, f in own.items()}
    new = topk_masks({n: scores[n] for n in own}, keeps)
    new.update({n: torch.ones_like(weights[n], dtype=torch.bool) if masks is None else masks[n].clone() for n in ignored})
    rest = [n for n in weights if n not in own and n not in ignored]
    if rest:
        counted = sum(weights[n].numel() for n in rest + ignored)  # ignored layers are dense and counted
        if counting == "openlth":
            remaining = sum(int(new[n].sum()) for n in ignored) + sum(
                weights[n].numel() if masks is None else int(masks[n].sum()) for n in rest
            )
            active = remaining - sum(int(new[n].sum()) for n in ignored)
            keep = max(0, active - (math.ceil(fraction * remaining) + 1))
        else:
            keep = level_keep(counted, fraction, level) - sum(weights[n].numel() for n in ignored)
        keep = max(keep, sum(floor.get(n, 0) for n in rest))
        if keep < 0:
            raise SparsityConfigError(
                f"level {level} keeps fewer weights than the ignored layers {ignored} hold: prune fewer levels"
            )
        new.update(global_topk_masks({n: scores[n] for n in rest}, keep))
    return {n: new[n] for n in weights}


def random_masks_like(masks: Mapping[str, Tensor], generator: torch.Generator) -> Masks:
    """Random masks with exactly the per-layer counts of ``masks`` (the random-pruning control)."""
    return topk_masks(random_scores(masks, generator), {n: int(m.sum()) for n, m in masks.items()})
