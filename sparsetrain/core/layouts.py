"""Where a target's inputs lie: the reading of a weight in which N:M groups are ``M`` consecutive inputs.

N:M sparsity is a property of the computation: each output keeps ``N`` of every ``M`` consecutive inputs
it reads. Which tensor dim holds those inputs depends on the layer, so it is recorded once per target, at
fit start, from the module that owns the weight (:func:`target_layouts`), as a :class:`Layout`:

===================  ==========================  =========  ========================================================
layer                weight                      inputs     a group: ``M`` consecutive ...
===================  ==========================  =========  ========================================================
``nn.Linear``        ``(out, in)``               dim 1      inputs of one output (``to_sparse_semi_structured``)
HF ``Conv1D``        ``(in, out)``               dim 0      inputs of one output: along dim 0
``ConvNd``           ``(out, in/g, *kernel)``    dim 1      ``nm_layout="channels"`` (default): input channels of one
                                                            output at one kernel position (NVIDIA ASP, TensorRT);
                                                            ``"flat"``: entries of ``weight.reshape(out, -1)``, kernel
                                                            positions fastest (the im2col row; sparsetrain <= 0.3)
``ConvTransposeNd``  ``(in, out/g, *kernel)``    dim 0      ``"channels"``: input channels (dim 0) of one output channel
                                                            at one kernel position; ``"flat"``: (input channel, kernel
                                                            position) pairs of one output channel, kernel fastest
anything else        ``(rows, ...)``             dim 1      entries of ``weight.reshape(rows, -1)`` (``include=`` globs)
===================  ==========================  =========  ========================================================

A :class:`Grouping` is that reading for one weight: ``weight.permute(dims)`` flattened and cut into groups
of ``M``; a layer *fits* ``N:M`` when ``M`` divides ``run``, the number of consecutive entries that belong
to one output (and, for a grouped convolution, one conv group: a group of ``M`` never mixes two). A 1x1
convolution reads the same in both conv layouts. ``weight.permute(dims)`` keeps dim 0 first wherever the
inputs are not on dim 0, so FSDP2's dim-0 shards hold whole groups; where they are (``Conv1D``,
``ConvTranspose``), :func:`check_pieces` requires every shard to start and stop on a group boundary.

Example::

    >>> g = Layout("conv").grouping((8, 16, 3, 3))       # channels: groups of 4 input channels per kernel position
    >>> g.dims, g.run
    ((0, 2, 3, 1), 16)
    >>> Layout("conv").grouping((8, 16, 3, 3), "flat").run  # the im2col row: 16 * 3 * 3
    144
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from sparsetrain.core.errors import SparsityConfigError

NM_LAYOUTS = ("channels", "flat")  # how a convolution's groups run (other layers have one reading)
KINDS = ("linear", "hf_conv1d", "conv", "conv_transpose", "rows")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class Grouping:
    """N:M groups of one weight: ``M`` consecutive entries of ``weight.permute(dims)`` (flattened), inside
    runs of ``run`` entries (one output's inputs); ``name`` says which reading it is (for reports)."""

    dims: tuple[int, ...]
    run: int
    name: str = "rows"

    def fits(self, m: int) -> bool:
        """Whether groups of ``m`` tile every run (a weight of 2 or more dims)."""
        return len(self.dims) >= 2 and self.run > 0 and self.run % m == 0

    def groups(self, t: Tensor, m: int) -> Tensor:
        """``t`` (the weight's shape, or a dim-0 piece of it) as ``(number of groups, m)`` (a copy unless ``dims`` is the identity)."""
        if list(self.dims) == sorted(self.dims):
            return t.reshape(-1, m)
        return t.permute(self.dims).reshape(-1, m)

    def ungroup(self, g: Tensor, shape: tuple[int, ...]) -> Tensor:
        """The inverse of :meth:`groups`: a tensor of ``shape`` (contiguous)."""
        if list(self.dims) == sorted(self.dims):
            return g.reshape(shape)
        permuted = tuple(shape[d] for d in self.dims)
        inverse = sorted(range(len(self.dims)), key=self.dims.__getitem__)
        return g.reshape(permuted).permute(inverse).contiguous()

    def inner(self, shape: tuple[int, ...]) -> int:
        """Entries that one index of dim 0 spans in the permuted order, at its place: where a dim-0 shard boundary
        falls among the groups (a multiple of ``M`` apart means whole groups)."""
        after = self.dims[self.dims.index(0) + 1 :]
        return math.prod(shape[d] for d in after)


@dataclass(frozen=True)
class Layout:
    """How a target's weight enters its layer: ``kind`` (one of :data:`KINDS`) and the conv ``groups``."""

    kind: str = "rows"
    groups: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Layout kind={self.kind!r}; allowed: {', '.join(KINDS)}")

    def grouping(self, shape: tuple[int, ...], nm_layout: str = "channels") -> Grouping:
        """The N:M reading of a weight of ``shape`` (``nm_layout``: ``channels`` or ``flat``, for convolutions)."""
        if nm_layout not in NM_LAYOUTS:
            raise SparsityConfigError(f"nm_layout={nm_layout!r}; allowed: {', '.join(map(repr, NM_LAYOUTS))}")
        nd, kernel = len(shape), tuple(range(2, len(shape)))
        channels = nm_layout == "channels"
        if self.kind == "hf_conv1d" and nd == 2:
            return Grouping((1, 0), shape[0], "hf_conv1d (in, out)")
        if self.kind == "conv" and nd >= 3:
            if channels:
                return Grouping((0, *kernel, 1), shape[1], "conv channels")
            return Grouping(tuple(range(nd)), math.prod(shape[1:]), "conv flat")
        if self.kind == "conv_transpose" and nd >= 3:
            per_group = shape[0] // self.groups  # dim 0 holds the input channels of every conv group
            if channels:
                return Grouping((1, *kernel, 0), per_group, "conv_transpose channels")
            return Grouping((1, 0, *kernel), per_group * math.prod(shape[2:]), "conv_transpose flat")
        name = "linear" if self.kind == "linear" else "rows"
        return Grouping(tuple(range(nd)), math.prod(shape[1:]) if nd >= 2 else 0, name)


ROWS = Layout()


def layout_of(module: nn.Module) -> Layout:
    """The :class:`Layout` of ``module``'s weight (Hugging Face's ``Conv1D`` found by class name, as in
    :mod:`sparsetrain.core.targets`)."""
    if isinstance(module, _CONV_TRANSPOSE):
        return Layout("conv_transpose", module.groups)
    if isinstance(module, _CONV):
        return Layout("conv", module.groups)
    if isinstance(module, nn.Linear):
        return Layout("linear")
    if any(c.__name__ == "Conv1D" for c in type(module).__mro__):
        return Layout("hf_conv1d")
    return ROWS


def target_layouts(model: nn.Module, targets: Mapping[str, Tensor]) -> dict[str, Layout]:
    """The layout of every target: that of the module whose weight it is (or stores: weight norm's ``v``,
    spectral norm's ``original``, which have the weight's shape); :data:`ROWS` for any other parameter.

    A parameter shared by several modules takes the first one's layout in ``named_modules`` order.
    """
    by_id: dict[int, Layout] = {}
    for module in model.modules():
        layout = layout_of(module)
        if layout is ROWS:
            continue
        weight = getattr(module, "weight", None)
        params = list(module.named_parameters(recurse=False))
        stored = getattr(module, "parametrizations", None)  # weight norm, spectral norm
        params += list(stored.named_parameters()) if stored is not None else []
        for name, p in params:
            if name != "bias" and weight is not None and tuple(p.shape) == tuple(weight.shape):  # the weight, or what stores it
                by_id.setdefault(id(p), layout)
    return {n: by_id.get(id(p), ROWS) for n, p in targets.items()}


def groupings(shapes: Mapping[str, tuple[int, ...]], layouts: Mapping[str, Layout] | None, nm_layout: str = "channels") -> dict[str, Grouping]:
    """The :class:`Grouping` of every target (``layouts=None``, or a target without one: :data:`ROWS`)."""
    layouts = layouts or {}
    return {n: layouts.get(n, ROWS).grouping(tuple(s), nm_layout) for n, s in shapes.items()}


def check_pieces(found: Mapping[str, Grouping], pieces: Mapping, shapes: Mapping[str, tuple[int, ...]], m: int) -> None:
    """Raise :class:`SparsityConfigError` when a dim-0 shard (``pieces[name]``, a :class:`~sparsetrain.core.shards.Piece`)
    of an N:M target starts or stops inside a group: its groups would be split between ranks."""
    bad = []
    for n, g in found.items():
        inner, piece = g.inner(shapes[n]), pieces[n]
        if (piece.start * inner) % m or (piece.stop * inner) % m:
            bad.append(f"{n} {tuple(shapes[n])} ({g.name}: this rank holds dim-0 rows [{piece.start}, {piece.stop}))")
    if bad:
        raise SparsityConfigError(
            f"N:M groups of {m} run along dim 0 of {', '.join(bad[:4])}, and the FSDP2 shards split some of them "
            f"between ranks. Allowed: a world size that gives every rank a multiple of {m} rows of dim 0 (torch.chunk: "
            f"ceil(rows / world) per rank), excluding these targets (exclude=), or DDP instead of FSDP2"
        )
