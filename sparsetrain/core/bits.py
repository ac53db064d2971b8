"""Bit packing of masks: 1 bit per weight, the one implementation for checkpoints and exports.

Little bit order, as ``numpy.packbits(..., bitorder="little")``: element ``8 j + i`` of a run is bit ``i``
(value ``1 << i``) of byte ``j``; the last byte of a run is zero-padded. :func:`pack_bits` packs a whole
tensor as one run (compressed exports); :func:`pack_rows` packs each row of dim 0 as its own run, so row
``r`` stays in row ``r`` and FSDP2's dim-0 shards of a mask stay shards (sharded checkpoints).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _pack_last(bits: Tensor) -> Tensor:
    """``uint8 (..., C)`` of 0/1 -> ``uint8 (..., ceil(C / 8))``."""
    pad = (-bits.shape[-1]) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return (bits.view(*bits.shape[:-1], -1, 8) << shifts).sum(-1, dtype=torch.uint8)


def _unpack_last(packed: Tensor, length: int) -> Tensor:
    """The inverse of :func:`_pack_last`: ``bool (..., length)``."""
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :length].bool()


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor, flattened in C order, as one run of bits: ``uint8 (ceil(numel / 8),)``."""
    return _pack_last(mask.reshape(-1).to(torch.uint8))


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """The inverse of :func:`pack_bits`: the first ``numel`` bits as a flat bool tensor."""
    return _unpack_last(packed.reshape(-1), numel)


def pack_rows(mask: Tensor) -> Tensor:
    """``bool (R, ...)`` -> ``uint8 (R, ceil(C / 8))``, ``C`` the elements per row (a 0-dim mask is one row)."""
    rows = mask.reshape(mask.shape[0], math.prod(mask.shape[1:])) if mask.dim() else mask.reshape(1, 1)
    return _pack_last(rows.to(torch.uint8))


def unpack_rows(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The inverse of :func:`pack_rows`: a ``bool`` tensor of ``shape`` (its rows: those of ``packed``)."""
    return _unpack_last(packed, math.prod(shape[1:])).reshape(shape)
