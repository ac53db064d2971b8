"""RigL: Rigging the Lottery (Evci et al. 2020): drop by magnitude, grow by gradient."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from sparsetrain.core.budgets import LAYER_DISTRIBUTIONS, Budget
from sparsetrain.core.masks import Masks, initial_random_scores, magnitude_scores
from sparsetrain.core.regrowth import drop_and_grow_layers, drop_count
from sparsetrain.core.schedules import UpdateSchedule, cosine_decay
from sparsetrain.core.validation import check_bool, check_choice, check_number, check_sparsity
from sparsetrain.methods.base import SparsityContext, SparsityMethod, register_method

DROP_FRACTION_SCHEDULES = ("cosine", "cosine_paper", "constant")
INITS = ("random", "magnitude")


@register_method("rigl", supports=("structure", "sharding", "gradients"))
class RigL(SparsityMethod):
    r"""Dynamic sparse training with a fixed number of weights per layer.

    Fit start: each layer keeps exactly its budget (``erk``, ``er`` or ``uniform``, with
    per-layer ``overrides``) at random positions drawn with the callback's seeded generator
    (``init="random"``) or at its largest initial ``|w|`` (``init="magnitude"``).

    Updates fire after optimizer steps ``t = start + every, start + 2 every, ...`` with
    ``t <= end`` (and at ``start`` itself when it is >= 1), the rule of
    :class:`~sparsetrain.core.schedules.UpdateSchedule` without a forced update at ``end``.
    There is no update at step 0: fit start has no gradient. (The TF reference also updates at
    step 0 and skips the optimizer step on update steps; here the optimizer step of every batch
    runs and the update follows it, using that step's gradient.) At an update each layer drops
    ``k = floor(f_t * n_active)`` active weights with the smallest ``|w|`` and grows ``k``
    positions with the largest ``|dL/dw|`` among those not kept (see
    :mod:`sparsetrain.core.regrowth` for ties, non-finite scores and dropped-then-regrown
    weights, which keep their value). ``dL/dw`` is the dense gradient of the update step's
    batch with respect to the masked weights, copied by the callback before it masks the
    gradient (after gradient accumulation, AMP unscaling and the DDP all-reduce). Only layers
    that the update step's optimizer trains move (with two optimizers, a GAN, each update moves
    the layers of the optimizer that made that step, with its real gradients; a frozen layer
    included by name never moves). Grown weights start at 0 and their optimizer state
    (momentum, Adam moments) at 0. Per-layer non-zero counts never change.

    Drop fraction: ``cosine`` decays from ``drop_fraction`` (alpha) at the first update to 0 at
    ``end``,

    .. math:: f_t = \frac{\alpha}{2}\left(1 + \cos\frac{\pi (t - \Delta T)}{T_{end} - \Delta T}\right),

    the paper's :math:`\frac{\alpha}{2}(1 + \cos(\pi t / T_{end}))` shifted by one interval so
    that the first update (step ``ΔT`` after ``start``, not 0 here) drops exactly alpha (the
    default, because our first update is at ``ΔT``, where the unshifted curve has already
    decayed). ``cosine_paper`` is the unshifted curve of the paper and of the reference code
    (google-research/rigl, jaxpruner, rigl-torch): at alpha = 0.3, ``ΔT = 100``,
    ``T_end = 1000`` it gives 0.2927, 0.2382 and 0.00734 at t = 100, 300, 900 where the default
    gives 0.3000, 0.2649 and 0.00905 (see ``docs/fidelity.md``). ``constant`` uses alpha at
    every update. ``skip_optimizer_step=True`` skips the optimizer step of every update step (all
    parameters of that optimizer keep their values and state; its gradient only decides the
    growth), as the TF reference does. An update whose ``k`` is 0 everywhere changes nothing (e.g. at
    ``end`` with ``cosine``, or every update if ``end <= every``). After ``end`` the topology is
    frozen.

    Args:
        sparsity: global sparsity in [0, 1).
        distribution: ``erk`` (default), ``er`` or ``uniform`` layer budgets.
        every: steps between updates (``ΔT``); an int, or a float in (0, 1] as a fraction of training.
        drop_fraction: alpha in (0, 1].
        end: last step with a topology update (int steps, or a fraction of training; default 0.75).
            An ``end`` beyond the run is allowed: updates then go on to the last step.
        drop_fraction_schedule: ``cosine`` (first update drops alpha), ``cosine_paper`` (the
            references' unshifted curve) or ``constant``.
        init: ``random`` or ``magnitude`` initial masks.
        power: ERK exponent (1 = ERK, 0 = uniform).
        overrides: per-layer sparsity by glob on target names, e.g. ``{"fc.weight": 0.5}``.
        overrides_mode: ``exact`` or ``outside`` (the RigL paper's first dense layer: ``overrides=
            {"conv1.weight": 0.0}, overrides_mode="outside"``), see :class:`~sparsetrain.core.budgets.Budget`.
        start: updates begin here (default 0: the first update is at ``every``).
        skip_optimizer_step: skip the optimizer step on update steps (TF reference); default False.
        structure: ``None`` (unstructured) or ``"N:M"`` (with ``distribution="uniform"`` and
            ``sparsity = 1 - N/M``): the initial mask keeps ``N`` of every ``M`` along the input
            dim, and each update regrows inside the groups it dropped from, as many as it dropped
            there, so every group always keeps ``N`` (:mod:`sparsetrain.core.regrowth`).
        indivisible: what layers that cannot hold the structure get: ``dense``, ``unstructured``
            (ordinary drop and grow) or ``error``.
        nm_layout: how a convolution's groups run: ``channels`` (default) or ``flat``, as in :class:`Static`.

    Logged at each update: ``rigl/drop_fraction`` (``f_t``) and ``rigl/regrown`` (sum of ``k``
    over layers; weights dropped and regrown in the same update count too; the callback's
    ``sparsity/mask_change/*`` counts only really new positions). No state beyond the
    configuration: the schedule is a pure function of the step.

    Example::

        trainer = L.Trainer(max_epochs=100, callbacks=[SparsityCallback(RigL(sparsity=0.9, every=100))])
    """

    prefix = "rigl"

    def __init__(
        self,
        sparsity: float = 0.9,
        distribution: str = "erk",
        every: int | float = 100,
        drop_fraction: float = 0.3,
        end: int | float = 0.75,
        drop_fraction_schedule: str = "cosine",
        init: str = "random",
        power: float = 1.0,
        overrides: Mapping[str, float] | None = None,
        start: int | float = 0,
        skip_optimizer_step: bool = False,
        overrides_mode: str = "exact",
        structure: str | None = None,
        indivisible: str = "dense",
        nm_layout: str = "channels",
    ):
        self.sparsity = check_sparsity(sparsity)
        self.drop_fraction = check_number(drop_fraction, "drop_fraction", 0.0, 1.0, low_open=True)
        self.drop_fraction_schedule = check_choice(drop_fraction_schedule, "drop_fraction_schedule", DROP_FRACTION_SCHEDULES)
        self.init = check_choice(init, "init", INITS)
        self.updates = UpdateSchedule(start, end, every, land_on_end=False)
        self.skip_optimizer_step = check_bool(skip_optimizer_step, "skip_optimizer_step")
        self.budget = Budget(
            distribution, power, overrides, overrides_mode, structure, indivisible, nm_layout, allowed=LAYER_DISTRIBUTIONS
        )
        self.budget.check_final(self.sparsity)

    def init_masks(self, ctx: SparsityContext) -> Masks:
        scores = initial_random_scores(ctx.params, ctx.generator, ctx.shards) if self.init == "random" else magnitude_scores(ctx.params)
        return self.budget.masks(scores, self.sparsity, ctx.shards, ctx.layouts)

    def needs_grads(self, step: int) -> bool:
        return self.is_update_step(step)

    def drop_fraction_at(self, step: int) -> float:
        """``f_t``: alpha at the first update (step ``start + every``), 0 at ``end`` (cosine), 0 after ``end``."""
        s = self._steps
        if step > s.end:
            return 0.0
        if self.drop_fraction_schedule == "constant":
            return self.drop_fraction
        if self.drop_fraction_schedule == "cosine_paper":
            return cosine_decay(step, self.drop_fraction, s.end)
        first = s.start if s.start >= 1 else s.start + s.every
        return cosine_decay(step, self.drop_fraction, s.end, start=first)

    def skips_optimizer_step(self, step: int) -> bool:
        return self.skip_optimizer_step and self.is_update_step(step)

    def moves(self, ctx: SparsityContext, name: str, grads: dict[str, Tensor] | None) -> bool:
        """Whether layer ``name`` drops and grows at this update: RigL needs its real gradient."""
        if grads is None:
            raise RuntimeError(f"{type(self).__name__} needs the dense gradients at an update; got none")
        return name in grads

    def grow_scores(self, ctx: SparsityContext, name: str, grads: dict[str, Tensor] | None) -> Tensor:
        """Grow scores, ranked by magnitude: RigL grows where the dense gradient is largest."""
        return grads[name]

    @torch.no_grad()
    def update(self, ctx: SparsityContext, step: int, grads: dict[str, Tensor] | None) -> Masks:
        fraction = self.drop_fraction_at(step)
        counts: list[int] = []

        def k_of(n_active: int) -> int:
            counts.append(drop_count(n_active, fraction, "floor"))
            return counts[-1]

        new = dict(ctx.masks)
        structured = self.budget.structured(ctx.shapes, ctx.layouts, ctx.shards)
        if fraction > 0:
            moving = [n for n in ctx.masks if self.moves(ctx, n, grads)]
            new.update(drop_and_grow_layers(
                {n: ctx.masks[n] for n in moving},
                {n: ctx.params[n] for n in moving},
                {n: self.grow_scores(ctx, n, grads) for n in moving},
                k_of,
                {n: self.budget.nm.m if n in structured else None for n in moving},
                ctx.shards,
                {n: structured[n].grouping for n in moving if n in structured},
            ))
        self.last_metrics = {f"{self.prefix}/drop_fraction": fraction, f"{self.prefix}/regrown": float(sum(counts))}
        return new
