"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune")."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sparsetrain.core.budgets import Budget
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.masks import Masks, magnitude_scores
from sparsetrain.core.schedules import SCHEDULES, UpdateSchedule, scheduled_sparsity
from sparsetrain.core.validation import check_choice, check_sparsity
from sparsetrain.methods.base import SparsityContext, SparsityMethod


class GMP(SparsityMethod):
    r"""Prune the smallest-magnitude active weights on a cubic schedule.

    .. math:: s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{t_{end} - t_0}\right)^3

    Masks are updated after optimizer steps ``start, start + every, ...`` and always at
    ``end``, where the sparsity is exactly ``sparsity`` (the rule of
    :class:`~sparsetrain.core.schedules.UpdateSchedule`). Fit start prunes to ``s_0``: the
    initial sparsity, or the final one when ``end == 0`` (one-shot pruning before training).
    After ``end`` the masks are frozen. Pruned weights never come back.

    Args:
        sparsity: final sparsity ``s_f`` in [0, 1).
        initial_sparsity: ``s_i`` in [0, sparsity].
        start, end: first and last update; an int counts optimizer steps, a float in (0, 1]
            is a fraction of training (all optimizer steps of the fit).
        every: steps between updates (int >= 1, or a fraction of training).
        distribution: ``uniform`` (every layer at ``s_t``), ``global`` (one magnitude
            threshold over all targets), ``erk`` or ``er`` (layer budgets from the shapes).
        schedule: ``cubic`` (default), ``linear`` or ``constant`` (one-shot at ``start``).
        power: ERK exponent.
        overrides: per-layer sparsity by glob on target names, e.g. ``{"fc.weight": 0.5}``;
            overridden layers follow their own value at the end of the schedule, scaled by
            the schedule's progress on the way.
        overrides_mode: ``exact`` (the other layers share what is left: the global sparsity is
            exact) or ``outside`` (overridden layers leave the budget, as rigl's
            ``custom_sparsity_map``; see :class:`~sparsetrain.core.budgets.Budget`).

    Example::

        SparsityCallback(GMP(sparsity=0.9, start=0.1, end=0.7, every=50))
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        initial_sparsity: float = 0.0,
        start: int | float = 0,
        end: int | float = 0.75,
        every: int | float = 100,
        distribution: str = "uniform",
        schedule: str = "cubic",
        power: float = 1.0,
        overrides: Mapping[str, float] | None = None,
        overrides_mode: str = "exact",
    ):
        self.sparsity = check_sparsity(sparsity)
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.sparsity:
            raise SparsityConfigError(
                f"initial_sparsity={initial_sparsity} is above sparsity={sparsity}; GMP only prunes, "
                "so initial_sparsity must be <= sparsity"
            )
        self.schedule = check_choice(schedule, "schedule", SCHEDULES)
        self.updates = UpdateSchedule(start, end, every)
        self.budget = Budget(distribution, power, overrides, overrides_mode)

    def check(self, shapes) -> None:
        for step in (0, self._steps.end):  # the budget moves linearly in between: the two ends decide
            self._budget_at(step).check(shapes, self.target_sparsity(step))

    def target_sparsity(self, step: int) -> float:
        if self._steps is None:
            return self.initial_sparsity
        s = self._steps
        return scheduled_sparsity(step, self.initial_sparsity, self.sparsity, s.start, s.end, self.schedule)

    def _budget_at(self, step: int) -> Budget:
        """Overrides follow the same schedule as the global value: scaled by its progress."""
        span = self.sparsity - self.initial_sparsity
        progress = 1.0 if span == 0 else (self.target_sparsity(step) - self.initial_sparsity) / span
        return self.budget.with_overrides({g: min(s, s * progress) for g, s in self.budget.overrides.items()})

    def _prune(self, ctx: SparsityContext, step: int) -> Masks:
        scores = magnitude_scores(ctx.params, ctx.masks)
        masks = self._budget_at(step).masks(scores, self.target_sparsity(step))
        if ctx.masks is not None:  # never revive a pruned weight (the target can dip, e.g. on a longer resumed run)
            masks = {n: m & ctx.masks[n] for n, m in masks.items()}
        return masks

    def init_masks(self, ctx: SparsityContext) -> Masks:
        return self._prune(ctx, 0)

    @torch.no_grad()
    def update(self, ctx: SparsityContext, step: int, grads=None) -> Masks:
        return self._prune(ctx, step)

    @torch.no_grad()
    def final_masks(self, ctx: SparsityContext) -> Masks:
        return self._prune(ctx, self._steps.end)
