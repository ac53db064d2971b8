"""Iterative magnitude pruning (IMP) arithmetic: how many weights survive level ``L``, and which.

Level ``L`` keeps ``round(N * (1 - p) ** L)`` of ``N`` weights (round half up), computed in
closed form from the dense count rather than by pruning ``ceil(p * remaining)`` again and
again as OpenLTH does: the density after ``L`` levels is then ``(1 - p) ** L`` within half
a weight (per layer for ``layerwise``, over the pooled layers for ``global``), and the two
rules differ by at most ``1 / p`` weights. The survivors are the largest ``|w|`` among the
weights that survived level ``L - 1`` (so masks only ever shrink).

``global`` pools all targets under one threshold (OpenLTH ``sparse_global``, the default);
``layerwise`` prunes every layer by the same fraction. ``layer_fractions`` maps globs on
target names to a layer's own fraction (first matching glob wins): those layers are pruned
layer-wise at their own rate, whatever ``pruning`` says (``0`` keeps a layer dense).

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
from sparsetrain.core.masks import Masks, global_topk_masks, magnitude_scores, random_scores, topk_masks

PRUNING = ("global", "layerwise")


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
) -> Masks:
    """Masks of level ``level`` from the trained weights and masks of level ``level - 1``."""
    if pruning not in PRUNING:
        raise SparsityConfigError(f"pruning={pruning!r} is unknown; allowed: {', '.join(PRUNING)}")
    check_fraction(fraction)
    scores = magnitude_scores(weights, masks)
    own = layer_fraction_map(list(weights), layer_fractions)
    if pruning == "layerwise":
        own = {n: own.get(n, fraction) for n in weights}
    new = topk_masks({n: scores[n] for n in own}, {n: level_keep(weights[n].numel(), f, level) for n, f in own.items()})
    rest = [n for n in weights if n not in own]
    if rest:
        keep = level_keep(sum(weights[n].numel() for n in rest), fraction, level)
        new.update(global_topk_masks({n: scores[n] for n in rest}, keep))
    return {n: new[n] for n in weights}


def random_masks_like(masks: Mapping[str, Tensor], generator: torch.Generator) -> Masks:
    """Random masks with exactly the per-layer counts of ``masks`` (the random-pruning control)."""
    return topk_masks(random_scores(masks, generator), {n: int(m.sum()) for n, m in masks.items()})
