"""GraNet (Liu et al. 2021): gradual global magnitude pruning with neuroregeneration."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparsetrain.core.budgets import LAYER_DISTRIBUTIONS, Budget, counts_from_densities
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.masks import Masks, global_topk_masks, initial_random_scores, magnitude_scores, topk_masks
from sparsetrain.core.regrowth import drop_and_grow_layers, drop_count
from sparsetrain.core.schedules import SCHEDULES, UpdateSchedule, cosine_decay, scheduled_sparsity
from sparsetrain.core.validation import check_choice, check_number, check_sparsity
from sparsetrain.methods.base import methods_supporting, SparsityContext, SparsityMethod, register_method


@register_method("granet", supports=("sharding", "gradients"))
class GraNet(SparsityMethod):
    r"""Prune gradually by global magnitude and regrow by gradient, dense-to-sparse or sparse-to-sparse.

    Fit start: all weights active (``initial_density=1``) or a random mask with exact per-layer
    counts for density ``d_i`` (``distribution``: ``erk``, ``er`` or ``uniform``).

    Updates fire after optimizer steps ``start, start + every, ...`` up to
    ``max(end, regrowth_end)``, and always at ``end`` (two
    :class:`~sparsetrain.core.schedules.UpdateSchedule`\ s on one grid: pruning lands on ``end``,
    regrowth goes on to ``regrowth_end``); never at step 0 (fit start has no gradient, and the
    schedule is still at its initial value there). At an update at step ``t``:

    1. **prune**: keep the ``K_t = round((1 - s_t) * N)`` largest ``|w|`` among the active
       weights of all ``N`` target weights, with the cubic schedule
       :math:`s_t = s_f + (s_i - s_f)(1 - (t - t_0)/(t_{end} - t_0))^3`, ``s_i = 1 - d_i``.
       At ``end`` the count is exactly ``round((1 - sparsity) * N)`` (the reference stops one
       interval short; we do not); after ``end`` nothing is pruned. ``pruning="layerwise"``
       (the reference's ``GraNet_uniform``) instead removes the same fraction of every layer's
       active weights, by magnitude within the layer (counts shared by largest remainder, so
       the total is still exactly ``K_t``; the reference rounds each layer up).
    2. **neuroregeneration** (while ``t < regrowth_end``): per layer drop
       ``ceil(r_t * nnz)`` active weights of smallest ``|w|`` and grow as many positions with
       the largest ``|dL/dw|`` (dense gradient of the step's batch) among those not kept (only
       in layers that the step's optimizer trains and that got a gradient), with
       :math:`r_t = r_{min} + \frac{r_0 - r_{min}}{2}(1 + \cos(\pi (t - t_0)/(T_{regrow} - t_0)))`,
       ``r_min = regrowth_floor`` (default 0; the reference's ``CosineDecay`` has ``eta_min=0.005``).

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
        pruning: ``global`` (one magnitude threshold, default) or ``layerwise`` (GraNet_uniform).
        regrowth_floor: ``r_min`` in [0, regrowth_fraction]: the regrowth fraction never decays below it.
        structure: only ``None`` (unstructured); an N:M value fails with the methods that have it.

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
        pruning: str = "global",
        regrowth_floor: float = 0.0,
        structure: str | None = None,
    ):
        if structure not in (None, "unstructured"):
            raise SparsityConfigError(
                f"structure={structure!r}: GraNet has no N:M option (its global threshold moves weights between layers, "
                f"which N:M forbids); allowed: None. For N:M use {', '.join(methods_supporting('structure'))} or the lottery app"
            )
        self.sparsity = check_sparsity(sparsity)
        self.initial_density = check_number(initial_density, "initial_density", 0.0, 1.0, low_open=True)
        if 1 - initial_density > self.sparsity + 1e-12:
            raise SparsityConfigError(
                f"initial_density={initial_density} is below the final density 1 - sparsity = {1 - sparsity:g}; "
                "GraNet only prunes, so initial_density must be >= 1 - sparsity"
            )
        self.budget = Budget(distribution, allowed=LAYER_DISTRIBUTIONS)  # of the initial random mask
        self.regrowth_fraction = check_number(regrowth_fraction, "regrowth_fraction", 0.0, 1.0)
        self.schedule = check_choice(schedule, "schedule", SCHEDULES)
        self.pruning = check_choice(pruning, "pruning", ("global", "layerwise"))
        self.regrowth_floor = check_number(regrowth_floor, "regrowth_floor", 0.0, self.regrowth_fraction)
        self.updates = UpdateSchedule(start, end, every)  # pruning, landing on end
        self.regrowth = UpdateSchedule(start, regrowth_end, every, land_on_end=False, names=("start", "regrowth_end", "every"))
        self._regrowth_steps: UpdateSchedule | None = None

    @property
    def initial_sparsity(self) -> float:
        return 1.0 - self.initial_density

    def setup(self, total_steps: int | None) -> None:
        super().setup(total_steps)
        self._regrowth_steps = self.regrowth.resolve(total_steps)

    def check(self, shapes, layouts=None) -> None:
        self.budget.check(shapes, self.initial_sparsity, layouts=layouts)

    def target_sparsity(self, step: int) -> float:
        if self._steps is None:
            return self.initial_sparsity
        s = self._steps
        return scheduled_sparsity(step, self.initial_sparsity, self.sparsity, s.start, s.end, self.schedule)

    def regrowth_fraction_at(self, step: int) -> float:
        """``r_t``: ``r_0`` at ``start``, cosine-decayed to 0 at ``regrowth_end``."""
        s = self._regrowth_steps
        if step < s.start or step >= s.end:
            return 0.0
        floor = self.regrowth_floor
        return floor + cosine_decay(step, self.regrowth_fraction - floor, s.end, start=s.start)

    def init_masks(self, ctx: SparsityContext) -> Masks:
        if self.initial_density == 1.0:
            return {n: torch.ones_like(p, dtype=torch.bool) for n, p in ctx.params.items()}
        return self.budget.masks(initial_random_scores(ctx.params, ctx.generator, ctx.shards), self.initial_sparsity, ctx.shards)

    def is_update_step(self, step: int) -> bool:
        return super().is_update_step(step) or (self._regrowth_steps is not None and self._regrowth_steps.is_update_step(step))

    def needs_grads(self, step: int) -> bool:
        return self.is_update_step(step) and self.regrowth_fraction_at(step) > 0

    def _prune(self, ctx: SparsityContext, keep: int, active: dict[str, int]) -> Masks:
        """Keep ``keep`` active weights by magnitude: one threshold, or the same fraction in every layer
        (``active``: each layer's active count now)."""
        scores = magnitude_scores(ctx.params, ctx.masks)
        if self.pruning == "global":
            return global_topk_masks(scores, keep, ctx.shards)
        share = keep / max(sum(active.values()), 1)
        shapes = ctx.shapes
        densities = {n: active[n] * share / math.prod(s) for n, s in shapes.items()}
        return topk_masks(scores, counts_from_densities(shapes, densities), ctx.shards)

    @torch.no_grad()
    def final_masks(self, ctx: SparsityContext) -> Masks:
        return self._prune(ctx, round((1.0 - self.sparsity) * sum(math.prod(s) for s in ctx.shapes.values())), ctx.active())

    @torch.no_grad()
    def update(self, ctx: SparsityContext, step: int, grads: dict[str, Tensor] | None) -> Masks:
        masks = ctx.masks
        total = sum(math.prod(s) for s in ctx.shapes.values())
        counts = ctx.active()
        active = sum(counts.values())
        keep = round((1.0 - self.target_sparsity(step)) * total)
        if keep < active:
            masks = self._prune(ctx, keep, counts)
        fraction, counts = self.regrowth_fraction_at(step), []  # counts: per-layer drop-and-grow k
        if fraction > 0:
            if grads is None:
                raise RuntimeError("GraNet needs the dense gradients for regrowth; got none")

            def k_of(n_active: int) -> int:
                counts.append(drop_count(n_active, fraction, "ceil"))
                return counts[-1]

            moving = [n for n in masks if n in grads]
            grown = drop_and_grow_layers({n: masks[n] for n in moving}, {n: ctx.params[n] for n in moving},
                                         {n: grads[n] for n in moving}, k_of, shards=ctx.shards)
            masks = {**masks, **grown}
        self.last_metrics = {
            "granet/regrowth_fraction": fraction,
            "granet/regrown": float(sum(counts)),
            "granet/pruned": float(max(active - keep, 0)),
            "granet/density": min(keep, active) / total,
        }
        return masks
