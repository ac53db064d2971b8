"""Exact top-k over tensors that may be sharded, without gathering them: one rule for every selection.

:func:`select` keeps, in every *group* of layers (one group per layer: per-layer top-k; one group
of all layers: a global threshold), exactly ``counts[g]`` positions: every score above the group's
``k``-th largest value ``t``, and of the scores equal to ``t`` the first ones in (layer order within
the group, flat index) order. The rule does not depend on how the tensors are cut, so a sharded
run keeps bitwise the masks of an unsharded one, whatever the world size.

How (a radix select on the float bits):

1. keys: ``float32`` -> ``int32`` with the same order (``-inf`` < ``-1`` < ``-0`` < ``+0`` < ... < ``+inf``),
   so the library's scores for masked-out (``-inf``) and non-finite (``-1``) weights keep their
   place; NaN must be replaced before.
2. ``32 / bits`` rounds (``bits=8``: 4): cut the key range still in play into ``2**bits`` parts,
   histogram the surviving keys of each group (one ``bincount`` per layer; only the first round
   reads every key), sum the ``groups x 2**bits`` histograms over the ranks (one all-reduce) and
   keep the part holding the ``k``-th largest key.
3. ties at ``t``: one all-gather of the per-layer tie counts; each rank keeps as many of its
   ties as the ranks before it (lower rows) left over.

Communication per call: ``4 * groups * 256 * 8`` bytes of all-reduce and ``8 * layers * world``
of all-gather, independent of the number of weights. Memory: an ``int32`` key per score. On whole
tensors with one layer per group the same rule runs as ``torch.topk`` on the keys plus a tie cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparsetrain.core.shards import Shards

BITS = 8


def order_keys(scores: Tensor) -> Tensor:
    """Flat ``int32`` keys with ``key(a) < key(b)`` iff ``a < b`` for the float32 values (no NaN)."""
    bits = scores.detach().float().contiguous().view(torch.int32).reshape(-1)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _layer_topk(keys: Tensor, k: int) -> Tensor:
    """The same rule on one whole tensor, by ``torch.topk`` (faster there than the radix rounds): the ``k``-th
    largest key ``t``, every key above it, and the first ``k - #(key > t)`` keys equal to it."""
    if not 0 <= k <= keys.numel():
        raise ValueError(f"select: a layer has {keys.numel()} positions, cannot keep {k}")
    if k == 0 or k == keys.numel():
        return torch.full_like(keys, k > 0, dtype=torch.bool)
    t = torch.topk(keys, k, sorted=False).values.min()
    keep = keys > t
    equal = keys == t
    return _with_first_ties(keep, equal, k - int(keep.sum()), int(equal.sum()))


def _with_first_ties(keep: Tensor, equal: Tensor, take: int, ties: int) -> Tensor:
    """``keep`` plus the first ``take`` of the ``ties`` positions in ``equal`` (flat index order)."""
    if take == ties:
        return keep | equal
    if take:  # only where the cut falls: a cumsum
        return keep | (equal & (equal.cumsum(0) <= take))
    return keep


def select(
    scores: Sequence[Tensor], groups: Sequence[Sequence[int]], counts: Sequence[int], shards: Shards | None = None
) -> list[Tensor]:
    """Boolean masks (shaped like ``scores``) keeping exactly ``counts[g]`` largest scores per group.

    ``scores``: one tensor per layer (this rank's piece when ``shards`` is given; rank order must be
    flat-index order, as for FSDP2's dim-0 shards); ``groups``: lists of indices into ``scores``;
    ``counts``: how many to keep in each group, over all pieces. Ties: lowest flat index first, in
    group order (module docstring).
    """
    if not scores:  # every rank has the same layers: all return here, no collective is left waiting
        return []
    keys = [order_keys(s) for s in scores]
    if shards is None and all(len(layers) == 1 for layers in groups):  # whole tensors, one layer per group
        masks: list[Tensor | None] = [None] * len(keys)
        for (i,), k in zip(groups, counts):
            masks[i] = _layer_topk(keys[i], int(k)).view(scores[i].shape)
        return masks
    device = scores[0].device
    n_groups, parts = len(groups), 1 << BITS
    k = torch.tensor(list(counts), dtype=torch.int64)
    lo = torch.full((n_groups,), -(1 << 31), dtype=torch.int64)  # count(key >= lo) >= k
    above = torch.zeros(n_groups, dtype=torch.int64)  # count(key >= lo + span) < k
    span, alive = 1 << 32, list(keys)
    for r in range(32 // BITS):
        step = span // parts
        hist = torch.zeros(n_groups, parts, dtype=torch.int64, device=device)
        digits: list[Tensor | None] = [None] * len(keys)
        for g, layers in enumerate(groups):
            for i in layers:
                a = alive[i]
                d = (a >> (32 - BITS)) + parts // 2 if r == 0 else (a - int(lo[g])) >> (step.bit_length() - 1)
                digits[i] = d
                hist[g] += torch.bincount(d, minlength=parts)
        if shards is not None:
            shards.sum(hist)
        hist = hist.cpu()
        if r == 0:
            sizes = hist.sum(1)
            bad = [g for g in range(n_groups) if not 0 <= int(k[g]) <= int(sizes[g])]
            if bad:
                raise ValueError(f"select: group {bad[0]} has {int(sizes[bad[0]])} positions, cannot keep {int(k[bad[0]])}")
        at_least = above[:, None] + hist.flip(1).cumsum(1).flip(1)  # [:, d] = #(key >= lo + d * step)
        j = (at_least[:, 1:] >= k[:, None]).sum(1)  # the highest part whose lower end has >= k above it
        above = torch.cat([at_least[:, 1:], above[:, None]], 1).gather(1, j[:, None]).squeeze(1)
        lo, span = lo + j * step, step
        j_dev = j.to(device)
        for g, layers in enumerate(groups):
            for i in layers:
                alive[i] = alive[i][digits[i] == j_dev[g]]
    need = (k - above).tolist()  # ties at t to keep per group
    threshold = [0] * len(keys)
    for g, layers in enumerate(groups):
        for i in layers:
            threshold[i] = int(lo[g])
    equal = [keys[i] == threshold[i] for i in range(len(keys))]
    tie_counts = torch.stack([e.sum() for e in equal]).long()
    ties = (shards.gather(tie_counts) if shards is not None else tie_counts.unsqueeze(0)).cpu()
    rank = 0 if shards is None else shards.rank
    masks = [None] * len(keys)
    for g, layers in enumerate(groups):
        before = 0  # ties of this group in earlier layers
        for i in layers:
            here = int(ties[rank, i])
            take = max(0, min(need[g] - before - int(ties[:rank, i].sum()), here))
            masks[i] = _with_first_ties(keys[i] > threshold[i], equal[i], take, here).view(scores[i].shape)
            before += int(ties[:, i].sum())
    return masks
