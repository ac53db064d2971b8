"""Counter-based uniform noise: the score of a weight depends only on (seed, layer, its flat index).

``u_i = top24(mix64(key + (i + 1) * GAMMA)) / 2**24`` with ``key = mix64(mix64(seed) + layer)``: the
SplitMix64 stream (Steele et al. 2014), computed in ``int64`` torch arithmetic (multiplication
wraps modulo ``2**64``) on the tensor's own device, in chunks, without the global RNG. A piece of
a sharded tensor draws exactly the numbers the whole tensor draws at its indices, so random
masks are identical on one device, under DDP and under FSDP at any world size. 24 bits give ties
in large layers; :func:`sparsetrain.core.select.select` breaks them by index, so counts stay exact.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor


def _s64(c: int) -> int:  # an unsigned 64-bit constant as the int64 with the same bits
    return c - (1 << 64) if c >= 1 << 63 else c


GAMMA, M1, M2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)
CHUNK = 1 << 16  # elements per piece: two 512 KiB int64 scratch tensors, reused


def _mix64_(z: Tensor, tmp: Tensor) -> Tensor:
    """SplitMix64's finalizer in place on ``int64`` ``z`` (a logical right shift is a masked arithmetic one)."""
    for shift, mul in ((30, M1), (27, M2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=tmp).bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(tmp)
        if mul is not None:
            z.mul_(mul)
    return z


def stream_key(seed: int, layer: str) -> int:
    """The stream of one layer: ``mix64(mix64(seed) + crc32(layer))``."""
    z, tmp = torch.tensor([_s64(seed % (1 << 64))], dtype=torch.int64), torch.empty(1, dtype=torch.int64)
    z = _mix64_(_mix64_(z, tmp).add_(zlib.crc32(layer.encode())), tmp)
    return int(z)


def uniform(seed: int, layer: str, start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """``float32`` in ``[0, 1)`` for the flat indices ``[start, start + count)`` of ``layer``'s stream."""
    key = stream_key(seed, layer)
    out = torch.empty(count, dtype=torch.float32, device=device)
    z = torch.empty(min(CHUNK, count), dtype=torch.int64, device=device)
    tmp = torch.empty_like(z)
    for lo in range(0, count, CHUNK):
        n = min(CHUNK, count - lo)
        zz, tt = z[:n], tmp[:n]
        torch.arange(start + lo + 1, start + lo + n + 1, dtype=torch.int64, out=zz)
        _mix64_(zz.mul_(GAMMA).add_(key), tt)
        torch.bitwise_right_shift(zz, 40, out=tt).bitwise_and_((1 << 24) - 1)
        out[lo : lo + n] = tt  # < 2**24: exact in float32
    return out.mul_(2.0**-24)
