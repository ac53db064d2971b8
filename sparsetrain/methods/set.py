"""SET: Sparse Evolutionary Training (Mocanu et al. 2018): drop by magnitude, grow at random."""

from __future__ import annotations

from torch import Tensor

from sparsetrain.core.masks import random_scores

from sparsetrain.methods.base import SparsityContext, register_method
from sparsetrain.methods.rigl import RigL


@register_method("set", supports=("structure", "sharding"))
class SET(RigL):
    """:class:`RigL` with random growth: same arguments, schedule, drop rule and invariants.

    Each update grows ``k`` positions drawn uniformly at random among those not kept after the
    drop (just-dropped positions included, as in the TF reference), with the callback's seeded
    generator: the draw is identical on every DDP rank and the generator state is saved in
    checkpoints, so resume is exact. SET needs no gradients.

    Example::

        trainer = L.Trainer(max_epochs=100, callbacks=[SparsityCallback(SET(sparsity=0.9, every=100))])
    """

    prefix = "set"

    def needs_grads(self, step: int) -> bool:
        return False

    def moves(self, ctx: SparsityContext, name: str, grads: dict[str, Tensor] | None) -> bool:
        """Every layer that the update step's optimizer trains (never a frozen one)."""
        return ctx.trains(name)

    def grow_scores(self, ctx: SparsityContext, name: str, grads: dict[str, Tensor] | None) -> Tensor:
        return random_scores({name: ctx.params[name]}, ctx.generator, ctx.shards)[name]
