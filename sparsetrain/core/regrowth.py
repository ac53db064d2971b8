"""Drop-and-grow on one mask: the topology step of dynamic sparse training (RigL, SET, GraNet).

For a boolean ``mask`` with ``n`` active positions and a count ``k <= n``:

1. **drop** the ``k`` active positions with the smallest ``|drop_scores|`` (RigL, SET, GraNet:
   the weights, so ``|w|``); the ``n - k`` others are *kept*;
2. **grow** the ``k`` positions with the largest ``|grow_scores|`` (RigL, GraNet: the dense
   gradient, so ``|dL/dw|``; SET: uniform noise) among all positions that are not kept.

Scores are ranked by absolute value inside (on the active positions only for the drop), which
saves a full pass over every weight tensor per update.

The new mask has exactly ``n`` active positions. Grow candidates include the positions just
dropped (RigL paper, Algorithm 1, and its TF reference): a weight dropped and regrown in the
same update simply stays active, and the callback keeps its value and optimizer state
(it resets only positions that were inactive before the update). So at most ``k``, and
possibly fewer, positions really change; a fully dense layer never changes.

Ties keep the lowest flat index (:func:`sparsetrain.core.select.select`): of equal
``|w|`` the later positions are dropped first, of equal grow scores the earlier ones grow. The
rule does not depend on the device or on how a tensor is sharded, so DDP ranks and FSDP shards
decide alike. Non-finite scores (NaN, inf) are the least important: such a weight is dropped before
every finite one, and a position whose grow score is non-finite is grown only when too few
finite candidates are left.

With ``group_size=M`` (N:M masks, see :mod:`sparsetrain.core.nm`) the drop is the same, but
the growth refills every group of ``M`` consecutive positions to the count it had before the
drop, with the largest ``|grow_scores|`` of that group: every group keeps its count (``N``), and
the layer still moves ``k`` positions. The groups are those of the target's
:class:`~sparsetrain.core.layouts.Grouping` where one is given (its real input dim), else of
``mask.reshape(-1)``.

Example::

    >>> mask = torch.tensor([True, True, False, False])
    >>> w = torch.tensor([0.5, -0.1, 0.0, 0.0]); g = torch.tensor([0.0, 0.0, 0.2, -0.9])
    >>> drop_and_grow(mask, w, g, 1)
    tensor([ True, False, False,  True])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from sparsetrain.core.layouts import Grouping
from sparsetrain.core.select import select
from sparsetrain.core.shards import Shards, total_counts


def drop_count(n_active: int, fraction: float, rounding: str = "floor") -> int:
    """``floor(fraction * n_active)`` (RigL, SET) or ``ceil`` (GraNet), clipped to ``[0, n_active]``."""
    raw = fraction * n_active
    k = math.ceil(raw - 1e-9) if rounding == "ceil" else math.floor(raw + 1e-9)
    return max(0, min(int(k), n_active))


def _score(t: Tensor) -> Tensor:
    """``|t|`` as flat float32, non-finite values as ``-1`` (below every finite magnitude)."""
    return t.detach().reshape(-1).abs().float().nan_to_num_(nan=-1.0, posinf=-1.0)


def _refill_groups(out: Tensor, before: Tensor, scores: Tensor, group_size: int, grouping: Grouping | None) -> Tensor:
    """``out`` (shaped like ``before``) grown, in every group of ``group_size`` (read by ``grouping``, else
    consecutive in the flat tensor), by as many positions as the group lost against ``before``: those of
    largest ``|scores|`` among the group's inactive ones."""
    grouping = grouping or Grouping(tuple(range(out.dim())), 0)
    groups, was = grouping.groups(out, group_size), grouping.groups(before, group_size)
    missing = was.sum(1) - groups.sum(1)
    if not bool(missing.any()):
        return out
    candidates = grouping.groups(_score(scores).view(scores.shape), group_size).masked_fill_(groups, float("-inf"))
    order = candidates.argsort(dim=1, descending=True, stable=True)
    take = torch.arange(group_size, device=out.device) < missing.unsqueeze(1)
    return grouping.ungroup(groups | torch.zeros_like(groups).scatter_(1, order, take), tuple(out.shape))


def drop_and_grow_layers(
    masks: Mapping[str, Tensor],
    drop_scores: Mapping[str, Tensor],
    grow_scores: Mapping[str, Tensor],
    k: Mapping[str, int] | Callable[[int], int],
    group_sizes: Mapping[str, int | None] | None = None,
    shards: Shards | None = None,
    groupings: Mapping[str, Grouping] | None = None,
) -> dict[str, Tensor]:
    """:func:`drop_and_grow` for every layer of ``masks`` at once (two selections in all, whatever the layer count).

    ``k``: per-layer counts, or a function of each layer's number of active positions; ``group_sizes``:
    N:M layers grow inside their groups (read by ``groupings[name]`` where given: the target's layout); ``shards``:
    the tensors are this rank's pieces of sharded targets (counts and selections are over the whole tensors; the
    result is bitwise the unsharded one).
    """
    names = list(masks)
    n_active = total_counts(masks, shards)
    ks = {n: k(n_active[n]) if callable(k) else k[n] for n in names}
    for n in names:
        if not 0 <= ks[n] <= n_active[n]:
            raise ValueError(f"k={ks[n]} must lie in [0, {n_active[n]}] (the number of active positions of {n})")
    kept = _keep_largest_active(masks, drop_scores, {n: n_active[n] - ks[n] for n in names}, shards)  # the drop
    sizes = group_sizes or {}
    _grow_({n: kept[n] for n in names if sizes.get(n) is None}, grow_scores, ks, shards)
    out = {n: kept[n].view(masks[n].shape) for n in names}
    for n in names:
        if sizes.get(n) is not None:
            out[n] = _refill_groups(out[n], masks[n], grow_scores[n], sizes[n], (groupings or {}).get(n))
    return out


def _keep_largest_active(
    masks: Mapping[str, Tensor], scores: Mapping[str, Tensor], keep: Mapping[str, int], shards: Shards | None
) -> dict[str, Tensor]:
    """Flat masks holding, of each mask's active positions, the ``keep[n]`` of largest ``|scores|`` (the scores
    are read at the active positions only: ~1/density cheaper than a pass over all of them)."""
    flat = {n: m.reshape(-1) for n, m in masks.items()}
    active = {n: f.nonzero().squeeze(1) for n, f in flat.items()}
    names = list(masks)
    picked = select([_score(scores[n])[active[n]] for n in names], [[i] for i in range(len(names))],
                    [keep[n] for n in names], shards)
    return {n: torch.zeros_like(flat[n]).scatter_(0, active[n][p], True) for n, p in zip(names, picked)}


def _grow_(flat: dict[str, Tensor], scores: Mapping[str, Tensor], k: Mapping[str, int], shards: Shards | None) -> None:
    """Set, in every flat mask of ``flat``, its ``k[n]`` inactive positions of largest ``|scores|``."""
    names = list(flat)
    grown = select([_score(scores[n]).masked_fill_(flat[n], float("-inf")) for n in names],
                   [[i] for i in range(len(names))], [k[n] for n in names], shards)
    for n, g in zip(names, grown):
        flat[n] |= g


def drop_smallest(mask: Tensor, scores: Tensor, k: int) -> Tensor:
    """``mask`` without its ``k`` active positions of smallest ``|scores|`` (a new tensor)."""
    return _keep_largest_active({"": mask}, {"": scores}, {"": int(mask.sum()) - k}, None)[""].view(mask.shape)


def grow_largest(mask: Tensor, scores: Tensor, k: int) -> Tensor:
    """``mask`` plus the ``k`` inactive positions of largest ``|scores|`` (a new tensor)."""
    out = {"": mask.reshape(-1).clone()}
    _grow_(out, {"": scores}, {"": k}, None)
    return out[""].view(mask.shape)


def drop_and_grow(
    mask: Tensor, drop_scores: Tensor, grow_scores: Tensor, k: int | Callable[[int], int], group_size: int | None = None
) -> Tensor:
    """Drop ``k`` active positions of smallest ``|drop_scores|``, grow ``k`` of largest ``|grow_scores|``.

    ``k`` is an int or a function of the number of active positions (e.g.
    ``lambda n: drop_count(n, 0.3)``). Returns a new mask with as many active positions as
    ``mask``; the inputs are not modified. ``group_size``: grow inside each group of that many
    consecutive positions (of ``mask.reshape(-1)``) as many as the drop took out of it.
    """
    counts = k if callable(k) else {"": k}
    return drop_and_grow_layers({"": mask}, {"": drop_scores}, {"": grow_scores}, counts, {"": group_size})[""]
