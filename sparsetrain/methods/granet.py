"""GraNet (Liu et al. 2021): gradual global magnitude pruning with neuroregeneration."""

from __future__ import annotations

import torch
from torch import Tensor

from sparsetrain.core.budgets import check_distribution
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.masks import Masks, budget_masks, global_topk_masks, magnitude_scores, random_scores
from sparsetrain.core.regrowth import drop_and_grow, drop_count
from sparsetrain.core.schedules import SCHEDULES, check_sparsity, cosine_decay, resolve_step, scheduled_sparsity
from sparsetrain.methods.base import SparsityContext, SparsityMethod


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class GraNet(SparsityMethod):
    r"""Prune gradually by global magnitude and regrow by gradient, dense-to-sparse or sparse-to-sparse.

    Fit start: all weights active (``initial_density=1``) or a random mask with exact per-layer
    counts for density ``d_i`` (``distribution``: ``erk``, ``er`` or ``uniform``).

    Updates fire after optimizer steps ``start, start + every, ...`` up to
    ``max(end, regrowth_end)``, and always at ``end``; never at step 0 (fit start has no
    gradient, and the schedule is still at its initial value there). At an update at step ``t``:

    1. **prune**: keep the ``K_t = round((1 - s_t) * N)`` largest ``|w|`` among the active
       weights of all ``N`` target weights, with the cubic schedule
       :math:`s_t = s_f + (s_i - s_f)(1 - (t - t_0)/(t_{end} - t_0))^3`, ``s_i = 1 - d_i``.
       At ``end`` the count is exactly ``round((1 - sparsity) * N)`` (the reference stops one
       interval short; we do not); after ``end`` nothing is pruned.
    2. **neuroregeneration** (while ``t < regrowth_end``): per layer drop
       ``ceil(r_t * nnz)`` active weights of smallest ``|w|`` and grow as many positions with
       the largest ``|dL/dw|`` (dense gradient of the step's batch) among those not kept, with
       :math:`r_t = \frac{r_0}{2}(1 + \cos(\pi (t - t_0)/(T_{regrow} - t_0)))`.

    Regrowth moves weights within a layer, so the total count after every update is exactly
    ``K_t`` (and while a layer is fully dense, regrowth cannot change it). Ties in ``|w|`` are
    broken by ``torch.topk``'s order. As in :class:`~sparsetrain.methods.RigL`, a position pruned or dropped and then
    regrown in the same update keeps its value; really new positions start at 0 with zero
    optimizer state. The optimizer step of an update step is not skipped: the update follows it.

    Args:
        sparsity: final sparsity ``s_f`` in [0, 1).
        initial_density: ``d_i`` in (0, 1], at least ``1 - sparsity``.
        distribution: layer budgets of the initial random mask when ``d_i < 1``.
        start, end: the pruning window (int steps or a float fraction of training).
        every: steps between updates.
        regrowth_fraction: ``r_0`` in [0, 1] (0 disables regrowth).
        regrowth_end: regrowth stops here (default 1.0: the end of training).
        schedule: ``cubic`` (default), ``linear`` or ``constant``.

    The reference code zeroes globally pruned weights before regrowth, so one pruned and
    regrown in the same update restarts at 0; here it keeps its value like a dropped one (the
    callback resets only positions inactive before the update).

    Logged at each update: ``granet/regrowth_fraction`` (``r_t``), ``granet/regrown`` (sum of
    the per-layer drop counts), ``granet/pruned`` (removed by the global step) and
    ``granet/density`` (``K_t / N``). No state beyond the configuration: schedules are pure
    functions of the step.

    Example::

        SparsityCallback(GraNet(sparsity=0.9, initial_density=0.5, end=0.5, every=100))
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        initial_density: float = 1.0,
        distribution: str = "erk",
        start: int | float = 0,
        end: int | float = 0.75,
        every: int | float = 100,
        regrowth_fraction: float = 0.5,
        regrowth_end: int | float = 1.0,
        schedule: str = "cubic",
    ):
        self.sparsity = check_sparsity(sparsity)
        if not _is_number(initial_density) or not 0 < initial_density <= 1:
            raise SparsityConfigError(f"initial_density={initial_density!r} must be a number in (0, 1]")
        if 1 - initial_density > self.sparsity + 1e-12:
            raise SparsityConfigError(
                f"initial_density={initial_density} is below the final density 1 - sparsity = {1 - sparsity:g}; "
                "GraNet only prunes, so initial_density must be >= 1 - sparsity"
            )
        self.initial_density = float(initial_density)
        self.distribution = check_distribution(distribution, ("uniform", "erk", "er"))
        if not _is_number(regrowth_fraction) or not 0 <= regrowth_fraction <= 1:
            raise SparsityConfigError(f"regrowth_fraction={regrowth_fraction!r} must be a number in [0, 1]")
        self.regrowth_fraction = float(regrowth_fraction)
        if schedule not in SCHEDULES:
            raise SparsityConfigError(f"schedule={schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
        self.schedule = schedule
        for key, value in (("start", start), ("end", end), ("every", every), ("regrowth_end", regrowth_end)):
            resolve_step(value, 1, key)
        if every == 0:
            raise SparsityConfigError("every=0 must be >= 1 (optimizer steps between updates)")
        if isinstance(start, int) and isinstance(end, int) and end < start:
            raise SparsityConfigError(f"end={end} is before start={start}; end must be >= start")
        self.start, self.end, self.every, self.regrowth_end = start, end, every, regrowth_end
        self._start = self._end = self._every = self._regrowth_end = None

    @property
    def initial_sparsity(self) -> float:
        return 1.0 - self.initial_density

    def setup(self, total_steps: int | None) -> None:
        self._start = resolve_step(self.start, total_steps, "start")
        self._end = resolve_step(self.end, total_steps, "end")
        self._every = max(1, resolve_step(self.every, total_steps, "every"))
        self._regrowth_end = resolve_step(self.regrowth_end, total_steps, "regrowth_end")
        if self._end < self._start:
            raise SparsityConfigError(
                f"end={self.end} ({self._end} steps) is before start={self.start} ({self._start} steps)"
            )
        if total_steps is not None and self._end > total_steps:
            raise SparsityConfigError(
                f"end={self.end} is step {self._end}, beyond the {total_steps} optimizer steps of this fit, "
                "so the final sparsity would never be reached; give end <= the number of training steps"
            )

    def target_sparsity(self, step: int) -> float:
        if self._start is None:
            return self.initial_sparsity
        return scheduled_sparsity(step, self.initial_sparsity, self.sparsity, self._start, self._end, self.schedule)

    def regrowth_fraction_at(self, step: int) -> float:
        """``r_t``: ``r_0`` at ``start``, cosine-decayed to 0 at ``regrowth_end``."""
        if step < self._start or step >= self._regrowth_end:
            return 0.0
        return cosine_decay(step, self.regrowth_fraction, self._regrowth_end, start=self._start)

    def init_masks(self, ctx: SparsityContext) -> Masks:
        if self.initial_density == 1.0:
            return {n: torch.ones_like(p, dtype=torch.bool) for n, p in ctx.params.items()}
        return budget_masks(random_scores(ctx.params, ctx.generator), self.initial_sparsity, self.distribution)

    def is_update_step(self, step: int) -> bool:
        if self._start is None or step <= 0 or step < self._start or step > max(self._end, self._regrowth_end):
            return False
        return (step - self._start) % self._every == 0 or step == self._end

    def needs_grads(self, step: int) -> bool:
        return self.is_update_step(step) and self.regrowth_fraction_at(step) > 0

    @torch.no_grad()
    def update(self, ctx: SparsityContext, step: int, grads: dict[str, Tensor] | None) -> Masks:
        masks = ctx.masks
        total = sum(p.numel() for p in ctx.params.values())
        active = sum(int(m.sum()) for m in masks.values())
        keep = round((1.0 - self.target_sparsity(step)) * total)
        if keep < active:
            masks = global_topk_masks(magnitude_scores(ctx.params, masks), keep)
        fraction, counts = self.regrowth_fraction_at(step), []  # counts: per-layer drop-and-grow k
        if fraction > 0:
            if grads is None:
                raise RuntimeError("GraNet needs the dense gradients for regrowth; got none")

            def k_of(n_active: int) -> int:
                counts.append(drop_count(n_active, fraction, "ceil"))
                return counts[-1]

            masks = {n: drop_and_grow(m, ctx.params[n], grads[n], k_of) for n, m in masks.items()}
        self.last_metrics = {
            "granet/regrowth_fraction": fraction,
            "granet/regrown": float(sum(counts)),
            "granet/pruned": float(max(active - keep, 0)),
            "granet/density": min(keep, active) / total,
        }
        return masks
