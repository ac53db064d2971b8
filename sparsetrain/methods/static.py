"""Static sparsity: random masks at fit start, never updated (Liu et al. 2022)."""

from __future__ import annotations

from collections.abc import Mapping

from sparsetrain.core.budgets import LAYER_DISTRIBUTIONS, Budget
from sparsetrain.core.masks import Masks, initial_random_scores
from sparsetrain.core.validation import check_sparsity
from sparsetrain.methods.base import SparsityContext, SparsityMethod, register_method


@register_method("static", supports=("structure", "sharding"))
class Static(SparsityMethod):
    """Random pruning at initialisation with exact per-layer counts.

    Each layer keeps exactly the number of weights its budget gives (``erk``, ``er`` or
    ``uniform``, with per-layer ``overrides`` of the sparsity by glob), at positions drawn
    with the callback's seeded generator. The masks never change. ``overrides_mode`` as in
    :class:`~sparsetrain.core.budgets.Budget`. ``structure="N:M"`` (with ``distribution="uniform"``
    and ``sparsity = 1 - N/M``) draws ``N`` random positions in every group of ``M`` along the input
    dim; ``indivisible`` says what layers that cannot hold it get (``dense``, ``unstructured`` or
    ``error``, see :mod:`sparsetrain.core.nm`); ``nm_layout`` how a convolution's groups run: ``channels``
    (default: input channels at each kernel position, NVIDIA's sparse convolutions) or ``flat``
    (``in * kh * kw``, kernel positions fastest), see :mod:`sparsetrain.core.layouts`.

    Example::

        SparsityCallback(Static(sparsity=0.9, distribution="erk"))
        SparsityCallback(Static(sparsity=0.5, distribution="uniform", structure="2:4"))
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        distribution: str = "erk",
        power: float = 1.0,
        overrides: Mapping[str, float] | None = None,
        overrides_mode: str = "exact",
        structure: str | None = None,
        indivisible: str = "dense",
        nm_layout: str = "channels",
    ):
        self.sparsity = check_sparsity(sparsity)
        self.budget = Budget(
            distribution, power, overrides, overrides_mode, structure, indivisible, nm_layout, allowed=LAYER_DISTRIBUTIONS
        )
        self.budget.check_final(self.sparsity)

    def init_masks(self, ctx: SparsityContext) -> Masks:
        return self.budget.masks(initial_random_scores(ctx.params, ctx.generator, ctx.shards), self.sparsity, ctx.shards, ctx.layouts)
