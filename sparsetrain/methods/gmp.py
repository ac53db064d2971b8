"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune")."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import torch

from sparsetrain.core.budgets import Budget, monotone_counts
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.masks import Masks, magnitude_scores
from sparsetrain.core.schedules import SCHEDULES, UpdateSchedule, scheduled_sparsity
from sparsetrain.core.validation import check_choice, check_sparsity
from sparsetrain.methods.base import SparsityContext, SparsityMethod, register_method

STRUCTURE_SCHEDULES = ("final", "groups")


@register_method("gmp", supports=("structure", "sharding"))
class GMP(SparsityMethod):
    r"""Prune the smallest-magnitude active weights on a cubic schedule.

    .. math:: s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{t_{end} - t_0}\right)^3

    Masks are updated after optimizer steps ``start, start + every, ...`` and always at
    ``end``, where the sparsity is exactly ``sparsity`` (the rule of
    :class:`~sparsetrain.core.schedules.UpdateSchedule`). Fit start prunes to ``s_0``: the
    initial sparsity, or the final one when ``end == 0`` (one-shot pruning before training).
    After ``end`` the masks are frozen. Pruned weights never come back.

    Counts are monotone: at every update each layer (each pool for ``global``: the overridden layers
    and the ranked rest) keeps the budget's count at ``s_t``, kept within what it holds and what it
    keeps at ``end`` (:func:`~sparsetrain.core.budgets.monotone_counts`), so no layer ever needs a
    pruned weight back and the last update holds exactly the budget's final counts.

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
        structure: ``None`` (unstructured) or ``"N:M"`` (with ``distribution="uniform"`` and
            ``sparsity = 1 - N/M``): pruning ends with exactly ``N`` of every ``M`` weights along
            the input dim (:mod:`sparsetrain.core.nm`).
        nm_layout: how a convolution's groups run: ``channels`` (default; input channels at each
            kernel position, the layout of NVIDIA's sparse convolutions) or ``flat`` (``in * kh * kw``
            with kernel positions fastest); see :mod:`sparsetrain.core.layouts`.
        structure_schedule: how an N:M run gets there. ``final`` (default): unstructured
            magnitude pruning on the schedule in which every group keeps at least its ``N``
            largest weights, so the last update leaves exactly ``N`` per group. ``groups``: every
            update leaves the same count ``N_t`` in every group, ``N_t = round(M (1 - s_t))``
            clipped to ``[N, M]`` (e.g. 4:4 -> 3:4 -> 2:4), and the target sparsity moves in
            steps of ``1/M``.
        indivisible: what layers that cannot hold the structure get: ``dense``, ``unstructured``
            (pruned on the schedule without structure) or ``error``.

    Example::

        SparsityCallback(GMP(sparsity=0.9, start=0.1, end=0.7, every=50))
        SparsityCallback(GMP(sparsity=0.5, structure="2:4"))  # 2:4 at the end
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
        structure: str | None = None,
        structure_schedule: str = "final",
        indivisible: str = "dense",
        nm_layout: str = "channels",
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
        self.budget = Budget(distribution, power, overrides, overrides_mode, structure, indivisible, nm_layout)
        self.budget.check_final(self.sparsity)
        self.structure_schedule = check_choice(structure_schedule, "structure_schedule", STRUCTURE_SCHEDULES)

    def check(self, shapes, layouts=None) -> None:
        for step in (0, self._steps.end):  # the budget moves linearly in between: the two ends decide
            self._budget_at(step).check(shapes, self.target_sparsity(step), layouts=layouts)

    def target_sparsity(self, step: int) -> float:
        if self._steps is None:
            return self.initial_sparsity
        s = self._steps
        value = scheduled_sparsity(step, self.initial_sparsity, self.sparsity, s.start, s.end, self.schedule)
        nm = self.budget.nm
        if nm is not None and self.structure_schedule == "groups":  # N_t of every M: steps of 1/M
            return 1.0 - min(nm.m, max(nm.n, round(nm.m * (1.0 - value)))) / nm.m
        return value

    def _budget_at(self, step: int) -> Budget:
        """Overrides follow the same schedule as the global value: scaled by its progress; ``groups``:
        the structure of the step (``N_t:M``, none while ``N_t = M``)."""
        span = self.sparsity - self.initial_sparsity
        sparsity = self.target_sparsity(step)
        progress = 1.0 if span == 0 else (sparsity - self.initial_sparsity) / span
        budget = self.budget.with_overrides({g: min(s, s * progress) for g, s in self.budget.overrides.items()})
        nm = budget.nm
        if nm is not None and self.structure_schedule == "groups":
            n_t = round(nm.m * (1.0 - sparsity))
            budget = replace(budget, structure=f"{n_t}:{nm.m}" if n_t < nm.m else None)
        return budget

    def _counts(self, ctx: SparsityContext, budget: Budget, step: int) -> dict[str, int]:
        """The budget's counts at ``step``, monotone along the schedule (N:M layers' are already)."""
        shapes = ctx.shapes
        counts = budget.pool_counts(shapes, self.target_sparsity(step), ctx.layouts)
        final = self._budget_at(self._steps.end).pool_counts(shapes, self.sparsity, ctx.layouts)
        held = budget.pooled(ctx.active() if ctx.masks is not None else {n: math.prod(s) for n, s in shapes.items()}, shapes)
        structured = set(budget.split(shapes, ctx.layouts)[0])  # round((1 - s_t) numel): monotone, and fixed by N_t:M
        free = {n: c for n, c in counts.items() if n not in structured}
        return {**counts, **monotone_counts(free, held, final)}

    def _prune(self, ctx: SparsityContext, step: int) -> Masks:
        scores = magnitude_scores(ctx.params, ctx.masks)
        budget = self._budget_at(step)
        masks = budget.masks(scores, self.target_sparsity(step), ctx.shards, ctx.layouts, self._counts(ctx, budget, step))
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
