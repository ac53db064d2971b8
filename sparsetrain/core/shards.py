"""Where each target's local tensor sits in its full tensor: sharded parameters (FSDP2 ``fully_shard``).

Under FSDP2 a parameter is a ``DTensor`` split along dim 0 over a 1-D device mesh: rank ``r``
holds the rows ``[start_r, stop_r)`` (``torch.chunk``'s rule, so rank order is row order; a rank
may hold no row). Masks are then plain ``bool`` tensors shaped like the *local* shard, applied by
the same kernel to ``p.to_local()``, its gradient and its optimizer state: a rank keeps only
``1 / world`` of every mask.

What must see the whole tensor goes through a :class:`Shards`: the full shapes (budgets), the
count of active weights (:meth:`Shards.sum`, one all-reduce of a few integers) and the top-k
selections of :mod:`sparsetrain.core.select`, which move histograms, never weights. Without
sharding (one device, DDP) every function takes ``shards=None``: the tensors are whole and
nothing is communicated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsetrain.core.errors import SparsityConfigError

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard as _ShardPlacement
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # torch built without distributed: nothing can be sharded
    dist, DTensor, _ShardPlacement = None, (), None


def local(t: Tensor | None) -> Tensor | None:
    """The rank's own part of ``t`` (``t.to_local()`` for a DTensor), ``t`` itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class Piece:
    """The rows ``[start, stop)`` of a tensor of ``shape`` that this rank holds."""

    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def row(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def offset(self) -> int:
        """Flat (row-major) index in the full tensor of the first local element."""
        return self.start * self.row


class Shards:
    """The layout of every sharded target, and the process group that holds the other pieces.

    ``bytes_sent`` and ``collectives`` count what this rank has put into collectives (for the benchmarks).
    """

    def __init__(self, pieces: Mapping[str, Piece], group=None):
        self.pieces = dict(pieces)
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bytes_sent = 0
        self.collectives = 0

    @classmethod
    def of(cls, params: Mapping[str, Tensor]) -> Shards | None:
        """The layout of ``params`` when they are DTensors sharded along dim 0 on one 1-D mesh, else ``None``.

        Raises :class:`SparsityConfigError` for layouts whose masks would need more than a row range per
        rank (tensor parallelism, HSDP's 2-D mesh, another sharded dim) and for a mix of sharded and plain targets.
        """
        sharded = {n: p for n, p in params.items() if isinstance(p, DTensor)}
        if not sharded:
            return None
        plain = [n for n in params if n not in sharded]
        if plain:
            raise SparsityConfigError(
                f"targets {plain[:4]} are plain tensors while {list(sharded)[:2]} are sharded (DTensor): fully_shard every "
                "module that holds a target, or the root module after the others, so that every target is sharded"
            )
        meshes = {(p.device_mesh.device_type, tuple(p.device_mesh.mesh.flatten().tolist())) for p in sharded.values()}
        for n, p in sharded.items():
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (_ShardPlacement(0),):
                raise SparsityConfigError(
                    f"target {n} is a DTensor with placements={tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; "
                    "sharded masks support FSDP2's layout only: placements=(Shard(dim=0),) on a 1-D mesh "
                    "(ModelParallelStrategy(tensor_parallel_size=1) with fully_shard; no tensor parallelism or HSDP yet)"
                )
        if len(meshes) > 1:
            raise SparsityConfigError(
                f"targets are sharded over {len(meshes)} different device meshes {sorted(meshes)}; shard every target over one mesh"
            )
        pieces = {}
        for n, p in sharded.items():
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            pieces[n] = Piece(tuple(p.shape), offset[0], offset[0] + shape[0])
        return cls(pieces, next(iter(sharded.values())).device_mesh.get_group())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: p.shape for n, p in self.pieces.items()}

    def sum(self, values: Tensor) -> Tensor:
        """``values`` summed over the ranks, in place (one all-reduce)."""
        self.bytes_sent += values.numel() * values.element_size()
        self.collectives += 1
        dist.all_reduce(values, group=self.group)
        return values

    def gather(self, values: Tensor) -> Tensor:
        """``(world, *values.shape)``: every rank's ``values``, in rank order (one all-gather)."""
        self.bytes_sent += values.numel() * values.element_size()
        self.collectives += 1
        out = [torch.empty_like(values) for _ in range(self.world)]
        dist.all_gather(out, values.contiguous(), group=self.group)
        return torch.stack(out)


def full_shapes(tensors: Mapping[str, Tensor], shards: Shards | None) -> dict[str, tuple[int, ...]]:
    """The shapes of the whole tensors (``tensors`` may be local pieces)."""
    if shards is None:
        return {n: tuple(t.shape) for n, t in tensors.items()}
    return {n: shards.pieces[n].shape for n in tensors}


def total_counts(masks: Mapping[str, Tensor], shards: Shards | None) -> dict[str, int]:
    """Active positions of every mask, counted over all its pieces (one all-reduce when sharded)."""
    if not masks:
        return {}
    counts = torch.stack([m.sum() for m in masks.values()]).long()
    if shards is not None:
        counts = shards.sum(counts)
    return dict(zip(masks, counts.tolist()))


def offsets(names, shards: Shards | None) -> dict[str, int]:
    """Flat index in the full tensor of each local piece's first element (0 without sharding)."""
    return {n: 0 if shards is None else shards.pieces[n].offset for n in names}
