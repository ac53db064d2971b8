"""Sparsity counted from the tensors themselves (never from a target value)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import math

import torch
from torch import Tensor

from sparsetrain.core.shards import DTensor, Shards, full_shapes, local


@dataclass
class LayerSparsity:
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    """Zeros per target and over all targets, counted with ``(w == 0).sum()``."""

    layers: dict[str, LayerSparsity] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers.values())

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers.values())

    @property
    def global_sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def metrics(self, prefix: str = "sparsity", per_layer: bool = True) -> dict[str, float]:
        """Flat ``{key: value}`` for loggers: ``sparsity/global`` and ``sparsity/layer/<name>``."""
        out = {f"{prefix}/global": self.global_sparsity}
        if per_layer:
            out.update({f"{prefix}/layer/{n}": layer.sparsity for n, layer in self.layers.items()})
        return out

    def to_dict(self) -> dict:
        return {
            "global": {"numel": self.numel, "zeros": self.zeros, "sparsity": self.global_sparsity},
            "layers": {
                n: {"numel": layer.numel, "zeros": layer.zeros, "sparsity": layer.sparsity}
                for n, layer in self.layers.items()
            },
        }

    def table(self) -> str:
        """A plain-text table, one row per target and a total row."""
        width = max([len(n) for n in self.layers] + [6])
        rows = [f"{'target':<{width}}  {'weights':>11}  {'zeros':>11}  {'sparsity':>8}"]
        for n, layer in self.layers.items():
            rows.append(f"{n:<{width}}  {layer.numel:>11,}  {layer.zeros:>11,}  {layer.sparsity:>8.2%}")
        rows.append(f"{'global':<{width}}  {self.numel:>11,}  {self.zeros:>11,}  {self.global_sparsity:>8.2%}")
        return "\n".join(rows)


@torch.no_grad()
def sparsity_report(params: Mapping[str, Tensor], shards: Shards | None = None) -> SparsityReport:
    """Count exact zeros in every tensor of ``params``.

    ``shards``: the tensors are this rank's pieces of sharded targets (DTensors or their local
    parts): zeros are counted in every piece and summed over the ranks (one all-reduce, so every
    rank must call it), sizes are those of the whole tensors. DTensors without ``shards`` are described
    with :meth:`Shards.of <sparsetrain.core.shards.Shards.of>` (e.g. ``model.named_parameters()`` under FSDP2).
    """
    if not params:
        return SparsityReport({})
    if shards is None and any(isinstance(p, DTensor) for p in params.values()):
        sharded = {n: p for n, p in params.items() if isinstance(p, DTensor)}  # plain ones are whole (e.g. the
        report = sparsity_report(sharded, Shards.of(sharded))  # root unit's unsharded parameters after a forward)
        whole = sparsity_report({n: p for n, p in params.items() if n not in sharded})
        return SparsityReport({n: (report.layers.get(n) or whole.layers[n]) for n in params})
    zeros = torch.stack([(local(p) == 0).sum() for p in params.values()]).long()
    if shards is not None:
        zeros = shards.sum(zeros)
    shapes = full_shapes(params, shards)
    return SparsityReport(
        {n: LayerSparsity(numel=math.prod(shapes[n]), zeros=z) for n, z in zip(params, zeros.tolist())}
    )
