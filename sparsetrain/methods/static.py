"""Static sparsity: random masks at fit start, never updated (Liu et al. 2022)."""

from __future__ import annotations

from collections.abc import Mapping

from sparsetrain.core.budgets import LAYER_DISTRIBUTIONS, Budget
from sparsetrain.core.masks import Masks, random_scores
from sparsetrain.core.validation import check_sparsity
from sparsetrain.methods.base import SparsityContext, SparsityMethod


class Static(SparsityMethod):
    """Random pruning at initialisation with exact per-layer counts.

    Each layer keeps exactly the number of weights its budget gives (``erk``, ``er`` or
    ``uniform``, with per-layer ``overrides`` of the sparsity by glob), at positions drawn
    with the callback's seeded generator. The masks never change. ``overrides_mode`` as in
    :class:`~sparsetrain.core.budgets.Budget`.

    Example::

        SparsityCallback(Static(sparsity=0.9, distribution="erk"))
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        distribution: str = "erk",
        power: float = 1.0,
        overrides: Mapping[str, float] | None = None,
        overrides_mode: str = "exact",
    ):
        self.sparsity = check_sparsity(sparsity)
        self.budget = Budget(distribution, power, overrides, overrides_mode, allowed=LAYER_DISTRIBUTIONS)

    def init_masks(self, ctx: SparsityContext) -> Masks:
        return self.budget.masks(random_scores(ctx.params, ctx.generator), self.sparsity)
