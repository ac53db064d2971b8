"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune")."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sparsetrain.core.budgets import check_distribution
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.masks import Masks, budget_masks, magnitude_scores
from sparsetrain.core.schedules import (
    SCHEDULES,
    check_sparsity,
    is_update_step,
    resolve_step,
    scheduled_sparsity,
    warn_if_beyond_training,
)
from sparsetrain.methods.base import SparsityContext, SparsityMethod


class GMP(SparsityMethod):
    r"""Prune the smallest-magnitude active weights on a cubic schedule.

    .. math:: s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{t_{end} - t_0}\right)^3

    Masks are updated after optimizer steps ``start, start + every, ...`` and always at
    ``end``, where the sparsity is exactly ``sparsity``; ``start == 0`` means an update at fit
    start. Before ``start`` the network has ``initial_sparsity`` (by magnitude at fit start),
    after ``end`` the masks are frozen. Pruned weights never come back.

    Args:
        sparsity: final sparsity ``s_f`` in [0, 1).
        initial_sparsity: ``s_i`` in [0, sparsity].
        start, end: first and last update; an int counts optimizer steps, a float in (0, 1]
            is a fraction of ``trainer.estimated_stepping_batches``.
        every: steps between updates (int, or a fraction of training).
        distribution: ``uniform`` (every layer at ``s_t``), ``global`` (one magnitude
            threshold over all targets), ``erk`` or ``er`` (layer budgets from the shapes).
        schedule: ``cubic`` (default), ``linear`` or ``constant`` (one-shot at ``start``).
        overrides: per-layer sparsity by glob on target names, e.g. ``{"fc.weight": 0.5}``;
            overridden layers follow their own value at the end of the schedule, scaled by
            the schedule's progress on the way.

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
    ):
        self.sparsity = check_sparsity(sparsity)
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.sparsity:
            raise SparsityConfigError(
                f"initial_sparsity={initial_sparsity} is above sparsity={sparsity}; GMP only prunes, "
                "so initial_sparsity must be <= sparsity"
            )
        if schedule not in SCHEDULES:
            raise SparsityConfigError(f"schedule={schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
        self.start, self.end, self.every = start, end, every
        self.distribution = check_distribution(distribution)
        self.schedule = schedule
        self.power = float(power)
        self.overrides = dict(overrides or {})
        self._start = self._end = self._every = None
        for key in ("start", "end", "every"):  # type checks that need no knowledge of the run
            resolve_step(getattr(self, key), 1, key)
        if isinstance(start, int) and isinstance(end, int) and end < start:
            raise SparsityConfigError(f"end={end} is before start={start}; end must be >= start")

    def setup(self, total_steps: int | None) -> None:
        self._start = resolve_step(self.start, total_steps, "start")
        self._end = resolve_step(self.end, total_steps, "end")
        self._every = max(1, resolve_step(self.every, total_steps, "every"))
        if self._end < self._start:
            raise SparsityConfigError(
                f"end={self.end} ({self._end} steps) is before start={self.start} ({self._start} steps)"
            )
        warn_if_beyond_training(self._end, total_steps, "end", self.end)

    def target_sparsity(self, step: int) -> float:
        if self._start is None:
            return self.initial_sparsity
        return scheduled_sparsity(step, self.initial_sparsity, self.sparsity, self._start, self._end, self.schedule)

    def _overrides_at(self, step: int) -> dict[str, float]:
        """Overrides follow the same schedule as the global value: scaled by its progress."""
        span = self.sparsity - self.initial_sparsity
        progress = 1.0 if span == 0 else (self.target_sparsity(step) - self.initial_sparsity) / span
        return {g: min(s, s * progress) for g, s in self.overrides.items()}

    def _prune(self, ctx: SparsityContext, step: int) -> Masks:
        scores = magnitude_scores(ctx.params, ctx.masks)
        masks = budget_masks(scores, self.target_sparsity(step), self.distribution, self.power, self._overrides_at(step))
        if ctx.masks is not None:  # never revive a pruned weight (the target can dip, e.g. on a longer resumed run)
            masks = {n: m & ctx.masks[n] for n, m in masks.items()}
        return masks

    def init_masks(self, ctx: SparsityContext) -> Masks:
        return self._prune(ctx, 0)

    def is_update_step(self, step: int) -> bool:
        return is_update_step(step, self._start, self._end, self._every)

    @torch.no_grad()
    def update(self, ctx: SparsityContext, step: int, grads=None) -> Masks:
        return self._prune(ctx, step)
