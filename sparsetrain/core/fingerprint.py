"""Mask fingerprints: one 63-bit hash per bool mask, to check that every rank holds the same masks.

``mask_hashes(masks)`` gives one ``int64`` per mask, a nonlinear hash of its bits, computed
on the mask's own device with integer tensor ops only: no ``nonzero``, no ``.item()``, no
host synchronisation. The same mask gives the same number on every device (CPU, CUDA) and
in every process.

How (for a flat mask of ``n`` bools, stored one byte each, 0 or 1):

1. the mask is read as 64-bit blocks ``B_j`` (bit ``u`` of ``B_j`` is ``mask[64 j + u]``; the
   last block padded with ``False``): the bytes are *viewed* (no copy) as ``int64`` words, each
   word's eight 0/1 bytes gathered into one byte by the multiply ``(w * 0x0102040810204080)
   >> 56`` (its partial products land on distinct bits, so there are no carries), and eight
   such bytes viewed as one ``int64``;
2. ``h_j = fmix64(B_j ^ fmix64(j + c))``: MurmurHash3's 64-bit finaliser (a bijection with full
   avalanche, in ``int64`` with the wrapping multiply torch has; ``>>`` made logical by a
   mask) of the block xor a mixed block index (``c`` from 2^64 / golden ratio), so the same
   bits at another position give an unrelated number;
3. ``H = sum_j h_j`` modulo 2^64 (``int64`` sums wrap around), then ``fmix64(H ^ fmix64(n))``
   with the top bit cleared.

Two different masks of the same size collide with probability about 2^-63 (a sum of
pseudo-random terms over the blocks where they differ), in contrast to a linear sum over the
positions (the old ``SparsityCallback._fingerprint``: the sum of ``p * a mod m`` over the
kept positions ``p``, where ``{0, 3}`` and ``{1, 2}`` give the same number, as does any
pair of opposite one-position shifts while no term wraps). Cost: O(n): three integer ops
on ``n / 8`` words and about 25 on ``n / 64`` blocks, in pieces of ``CPU_CHUNK_BLOCKS`` on
the CPU; about 0.5 ns per weight for ResNet-50's masks on one CPU thread, against 2-8 for
the old scheme, whose cost grows with the kept weights (``experiments/bench_fingerprint.py``). :func:`mask_hash_reference` is the definition in
plain Python integers.

The hashes are clear of the top bit (in ``[0, 2^63)``), so ``-h`` never overflows and one
all-reduce with MAX over ``[h, -h]`` gives every layer's maximum and (minus) minimum over the
ranks: a layer's masks differ somewhere iff its max != min (:func:`disagreeing`,
:func:`compare_across_ranks`). That is 2 L int64 numbers per check, whatever the number of
ranks (an ``all_gather`` moves W x L).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sparsetrain.core.distributed import all_reduce_max

__all__ = ["CPU_CHUNK_BLOCKS", "compare_across_ranks", "disagreeing", "mask_hash_reference", "mask_hashes"]

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """The int64 whose bits are ``x mod 2^64``."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_FMIX1 = 0xFF51AFD7ED558CCD  # MurmurHash3 fmix64 constants
_FMIX2 = 0xC4CEB9FE1A85EC53
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio (splitmix64's increment)
_GATHER = 0x0102040810204080  # byte j's bit 0 -> bit 56 + j
_LOW31 = (1 << 31) - 1  # (k >> 33) & _LOW31: a logical shift right by 33 on int64
_TOP_CLEAR = (1 << 63) - 1
_S_FMIX1, _S_FMIX2, _S_GOLDEN = _signed(_FMIX1), _signed(_FMIX2), _signed(_GOLDEN)

_SALT = _GOLDEN >> 24  # c: the block index's offset (small enough that first + c + j never overflows)
# 64-bit blocks per piece on CPU: 32 Ki blocks = 2 Mi mask bytes, 2 MiB int64 temporaries that are
# reused (whole-tensor temporaries of a large mask were mapped fresh by glibc on every call and
# page-faulted: 0.8-1.1 against 0.23 ns per weight for a 4096 x 11008 mask, one thread). On CUDA
# a mask is one piece.
CPU_CHUNK_BLOCKS = 1 << 15


def _fmix64_int(k: int) -> int:
    """fmix64 on a Python int (mod 2^64): the reference for the tensor version."""
    k &= _MASK64
    k ^= k >> 33
    k = (k * _FMIX1) & _MASK64
    k ^= k >> 33
    k = (k * _FMIX2) & _MASK64
    k ^= k >> 33
    return k


def _fmix64_(k: Tensor) -> Tensor:
    """fmix64 in place on an int64 tensor (wrapping multiply; ``>>`` made logical by a mask)."""
    k.bitwise_xor_(k.bitwise_right_shift(33).bitwise_and_(_LOW31))
    k.mul_(_S_FMIX1)
    k.bitwise_xor_(k.bitwise_right_shift(33).bitwise_and_(_LOW31))
    k.mul_(_S_FMIX2)
    k.bitwise_xor_(k.bitwise_right_shift(33).bitwise_and_(_LOW31))
    return k


def _block_sum(blocks: Tensor, first: int) -> Tensor:
    """``sum_j fmix64(B_j ^ fmix64(first + j + c))`` mod 2^64 over int64 ``blocks`` (a 0-dim int64)."""
    salt = torch.arange(first + _SALT, first + _SALT + blocks.numel(), dtype=torch.int64, device=blocks.device)
    return _fmix64_(_fmix64_(salt).bitwise_xor_(blocks)).sum()


def _pack_blocks(words: Tensor) -> Tensor:
    """The 64-bit blocks of ``8 * k`` int64 words of 0/1 bytes (``k`` blocks; bit ``u`` of block ``j`` is
    byte ``64 j + u``): each word's 8 bytes gathered into one byte by one multiply, 8 such bytes per block."""
    return words.mul(_GATHER).bitwise_right_shift_(56).to(torch.uint8).view(torch.int64)


def _one_hash(mask: Tensor) -> Tensor:
    flat = mask.reshape(-1)
    if flat.dtype != torch.bool:
        raise TypeError(f"mask_hashes takes bool masks, got a {flat.dtype} tensor of shape {tuple(mask.shape)}")
    n = flat.numel()
    full = n // 64  # whole 64-bit blocks
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    if full:
        body = flat[: 64 * full].view(torch.uint8)
        try:
            words = body.view(torch.int64)
        except RuntimeError:  # a view at an offset that is not a multiple of 8 bytes
            words = body.clone().view(torch.int64)
        step = CPU_CHUNK_BLOCKS if flat.device.type == "cpu" else full
        for first in range(0, full, step):
            total += _block_sum(_pack_blocks(words[8 * first : 8 * (first + step)]), first)
    if n % 64:  # the last, partial block, as if padded with False
        rest = flat[64 * full :].to(torch.int64)
        shifts = torch.arange(rest.numel(), dtype=torch.int64, device=flat.device)
        total += _block_sum(rest.bitwise_left_shift_(shifts).sum().reshape(1), full)
    total.bitwise_xor_(_signed(_fmix64_int(n)))
    return _fmix64_(total.reshape(1)).reshape(()).bitwise_and_(_TOP_CLEAR)


def mask_hashes(masks: Sequence[Tensor]) -> Tensor:
    """One hash per bool mask: an ``int64`` tensor of shape ``(len(masks),)`` in ``[0, 2^63)``.

    On the device of the first mask (every mask is hashed on its own device and the results
    moved there; no host synchronisation). Equal masks give equal hashes on every device and
    in every process; different masks of the same size differ with probability ~1 - 2^-63.
    The size is mixed in (a mask and the same mask padded with ``False`` differ); the shape
    is not (a mask and its ``reshape`` are the same bits).

    >>> import torch
    >>> a, b = torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    >>> a[[0, 3]] = True; b[[1, 2]] = True
    >>> h = mask_hashes([a, b, a.clone()])
    >>> bool(h[0] != h[1]), bool(h[0] == h[2])
    (True, True)
    """
    masks = list(masks)
    if not masks:
        return torch.zeros(0, dtype=torch.int64)
    device = masks[0].device
    return torch.stack([_one_hash(m).to(device) for m in masks])


def mask_hash_reference(mask: Tensor) -> int:
    """The same hash in plain Python integers (slow; for tests): what :func:`mask_hashes` must give."""
    bits = [int(b) for b in mask.reshape(-1).tolist()]
    n = len(bits)
    total = 0
    for j in range(0, (n + 63) // 64):
        block = sum(bit << u for u, bit in enumerate(bits[64 * j : 64 * j + 64]))
        total += _fmix64_int(block ^ _fmix64_int(j + _SALT))
    return _fmix64_int((total & _MASK64) ^ _fmix64_int(n)) & _TOP_CLEAR


def disagreeing(max_and_neg_min: Tensor) -> Tensor:
    """Indices of the layers whose hashes differ across ranks, from the MAX all-reduce of
    ``torch.cat([hashes, -hashes])``: layer ``l`` disagrees iff ``max_l != min_l``, i.e.
    ``out[l] != -out[L + l]``. A 1-D ``int64`` tensor of layer indices (empty: all agree)."""
    n = max_and_neg_min.numel() // 2
    return (max_and_neg_min[:n] != -max_and_neg_min[n:]).nonzero().reshape(-1)


def compare_across_ranks(hashes: Tensor, strategy: Any = None) -> list[int]:
    """The indices of the layers whose hash is not the same on every rank ([] when all agree).

    One MAX all-reduce of ``torch.cat([hashes, -hashes])`` (2 L int64 numbers): through
    ``strategy.reduce(..., reduce_op="max")`` when a Lightning strategy is given (Lightning's ``_sync_ddp``,
    a barrier then one ``torch.distributed.all_reduce``), else on ``torch.distributed``'s default group
    (:mod:`sparsetrain.core.distributed`); the identity in a single process. Every rank must call it (it is a
    collective) with the same number of hashes, and every rank gets the same answer. One host
    synchronisation: the returned Python list.
    """
    hashes = hashes.reshape(-1).to(dtype=torch.int64)
    if strategy is None:
        return disagreeing(all_reduce_max(torch.cat([hashes, -hashes]))).tolist()
    both = torch.cat([hashes, -hashes]).to(strategy.root_device)  # a fresh tensor: the all-reduce works in place
    return disagreeing(strategy.reduce(both, reduce_op="max")).tolist()
