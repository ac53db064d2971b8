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

Ties are broken by ``torch.topk`` on the flattened tensor: deterministic for identical inputs
on the same device (so identical on every DDP rank), but otherwise unspecified; no noise is
added. Non-finite scores (NaN, inf) are the least important: such a weight is dropped before
every finite one, and a position whose grow score is non-finite is grown only when too few
finite candidates are left.

With ``group_size=M`` (N:M masks, see :mod:`sparsetrain.core.nm`) the drop is the same, but
the growth refills every group of ``M`` consecutive positions to the count it had before the
drop, with the largest ``|grow_scores|`` of that group: every group keeps its count (``N``), and
the layer still moves ``k`` positions.

Example::

    >>> mask = torch.tensor([True, True, False, False])
    >>> w = torch.tensor([0.5, -0.1, 0.0, 0.0]); g = torch.tensor([0.0, 0.0, 0.2, -0.9])
    >>> drop_and_grow(mask, w, g, 1)
    tensor([ True, False, False,  True])
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def drop_count(n_active: int, fraction: float, rounding: str = "floor") -> int:
    """``floor(fraction * n_active)`` (RigL, SET) or ``ceil`` (GraNet), clipped to ``[0, n_active]``."""
    raw = fraction * n_active
    k = math.ceil(raw - 1e-9) if rounding == "ceil" else math.floor(raw + 1e-9)
    return max(0, min(int(k), n_active))


def _drop_(out: Tensor, active: Tensor, scores: Tensor, k: int) -> None:
    """Clear, in the flat mask ``out``, the ``k`` positions of ``active`` with the smallest ``|scores|``."""
    if k > 0:  # top-k over the active positions only: ~1/density times cheaper than over all
        drop = scores.reshape(-1)[active].abs().float().nan_to_num_(nan=-1.0, posinf=-1.0)  # non-finite: dropped first
        picked = torch.topk(drop, k, largest=False, sorted=False).indices
        out.scatter_(0, active[picked], False)


def _grow_(out: Tensor, scores: Tensor, k: int) -> None:
    """Set, in the flat mask ``out``, the ``k`` inactive positions with the largest ``|scores|``."""
    if k > 0:
        candidates = scores.reshape(-1).abs().float().nan_to_num_(nan=-1.0, posinf=-1.0).masked_fill_(out, float("-inf"))
        out.scatter_(0, torch.topk(candidates, k, sorted=False).indices, True)


def _refill_groups_(out: Tensor, before: Tensor, scores: Tensor, group_size: int) -> None:
    """In the flat mask ``out``, grow in every group of ``group_size`` as many positions as it lost
    against ``before``, those of largest ``|scores|`` among the group's inactive ones."""
    groups, was = out.view(-1, group_size), before.view(-1, group_size)
    missing = was.sum(1) - groups.sum(1)
    if not bool(missing.any()):
        return
    candidates = scores.reshape(-1, group_size).abs().float().nan_to_num(nan=-1.0, posinf=-1.0).masked_fill_(groups, float("-inf"))
    order = candidates.argsort(dim=1, descending=True, stable=True)
    take = torch.arange(group_size, device=out.device) < missing.unsqueeze(1)
    groups |= torch.zeros_like(groups).scatter_(1, order, take)


def drop_smallest(mask: Tensor, scores: Tensor, k: int) -> Tensor:
    """``mask`` without its ``k`` active positions of smallest ``|scores|`` (a new tensor)."""
    out = mask.reshape(-1).clone()
    _drop_(out, out.nonzero().squeeze(1), scores, k)
    return out.view(mask.shape)


def grow_largest(mask: Tensor, scores: Tensor, k: int) -> Tensor:
    """``mask`` plus the ``k`` inactive positions of largest ``|scores|`` (a new tensor)."""
    out = mask.reshape(-1).clone()
    _grow_(out, scores, k)
    return out.view(mask.shape)


def drop_and_grow(
    mask: Tensor, drop_scores: Tensor, grow_scores: Tensor, k: int | Callable[[int], int], group_size: int | None = None
) -> Tensor:
    """Drop ``k`` active positions of smallest ``|drop_scores|``, grow ``k`` of largest ``|grow_scores|``.

    ``k`` is an int or a function of the number of active positions (e.g.
    ``lambda n: drop_count(n, 0.3)``). Returns a new mask with as many active positions as
    ``mask``; the inputs are not modified. ``group_size``: grow inside each group of that many
    consecutive positions (of ``mask.reshape(-1)``) as many as the drop took out of it.
    """
    out = mask.reshape(-1).clone()
    active = out.nonzero().squeeze(1)
    k = k(active.numel()) if callable(k) else k
    if not 0 <= k <= active.numel():
        raise ValueError(f"k={k} must lie in [0, {active.numel()}] (the number of active positions)")
    _drop_(out, active, drop_scores, k)
    if group_size is None:
        _grow_(out, grow_scores, k)
    else:
        _refill_groups_(out, mask.reshape(-1), grow_scores, group_size)
    return out.view(mask.shape)
