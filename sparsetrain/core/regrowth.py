"""Drop-and-grow on one mask: the topology step of dynamic sparse training (RigL, SET, GraNet).

For a boolean ``mask`` with ``n`` active positions and a count ``k <= n``:

1. **drop** the ``k`` active positions with the smallest ``drop_scores`` (RigL, SET, GraNet:
   ``|w|``); the ``n - k`` others are *kept*;
2. **grow** the ``k`` positions with the largest ``grow_scores`` (RigL, GraNet: ``|dL/dw|``;
   SET: uniform noise) among all positions that are not kept.

The new mask has exactly ``n`` active positions. Grow candidates include the positions just
dropped (RigL paper, Algorithm 1, and its TF reference): a weight dropped and regrown in the
same update simply stays active, and the callback keeps its value and optimizer state
(it resets only positions that were inactive before the update). So at most ``k``, and
possibly fewer, positions really change; a fully dense layer never changes.

Ties are broken by ``torch.topk`` on the flattened tensor: deterministic for identical inputs
on the same device (so identical on every DDP rank), but otherwise unspecified; no noise is
added. NaN grow scores count as 0.

Example::

    >>> mask = torch.tensor([True, True, False, False])
    >>> w = torch.tensor([0.5, 0.1, 0.0, 0.0]); g = torch.tensor([0.0, 0.0, 0.2, 0.9])
    >>> drop_and_grow(mask, w.abs(), g.abs(), 1)
    tensor([ True, False, False,  True])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def drop_count(n_active: int, fraction: float, rounding: str = "floor") -> int:
    """``floor(fraction * n_active)`` (RigL, SET) or ``ceil`` (GraNet), clipped to ``[0, n_active]``."""
    raw = fraction * n_active
    k = math.ceil(raw - 1e-9) if rounding == "ceil" else math.floor(raw + 1e-9)
    return max(0, min(int(k), n_active))


def drop_smallest(mask: Tensor, scores: Tensor, k: int) -> Tensor:
    """``mask`` without its ``k`` active positions of smallest score."""
    flat = mask.reshape(-1)
    if k <= 0:
        return mask.clone()
    s = scores.reshape(-1).float().masked_fill(~flat, float("inf"))
    out = flat.clone()
    out[torch.topk(s, k, largest=False, sorted=False).indices] = False
    return out.view(mask.shape)


def grow_largest(mask: Tensor, scores: Tensor, k: int) -> Tensor:
    """``mask`` plus the ``k`` inactive positions of largest score."""
    flat = mask.reshape(-1)
    if k <= 0:
        return mask.clone()
    s = torch.nan_to_num(scores.reshape(-1).float(), nan=0.0).masked_fill(flat, float("-inf"))
    out = flat.clone()
    out[torch.topk(s, k, largest=True, sorted=False).indices] = True
    return out.view(mask.shape)


def drop_and_grow(mask: Tensor, drop_scores: Tensor, grow_scores: Tensor, k: int) -> Tensor:
    """Drop ``k`` active positions of smallest ``drop_scores``, grow ``k`` of largest ``grow_scores``.

    Returns a new mask with the same number of active positions as ``mask``.
    """
    n_active = int(mask.sum())
    if not 0 <= k <= n_active:
        raise ValueError(f"k={k} must lie in [0, {n_active}] (the number of active positions)")
    return grow_largest(drop_smallest(mask, drop_scores, k), grow_scores, k)
