"""Stochastic subnetwork annealing (Whitaker & Whitley 2024).

Fine-tuning a network into a sparse target subnetwork without cutting the other weights at
once: every weight outside the target is still included on a training forward pass with a
probability that is annealed to zero, so the subnetwork settles gradually.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from sparsetrain.checkpoint import load_masks
from sparsetrain.core.budgets import Budget
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.masks import Masks, initial_random_scores, magnitude_scores
from sparsetrain.core.schedules import UpdateSchedule
from sparsetrain.core.stochastic import annealing_scale
from sparsetrain.core.validation import check_choice, check_number, check_sparsity
from sparsetrain.methods.base import SparsityContext, SparsityMethod, register_method

TARGETS = ("magnitude", "random", "from_checkpoint")
PROBABILITIES = ("constant", "random")
ANNEALING_SCHEDULES = ("linear", "cosine", "exponential")


@register_method("annealing", supports=("structure", "soft_masks"))
class StochasticAnnealing(SparsityMethod):
    r"""Anneal the weights outside a target subnetwork out of the network with stochastic masks.

    A deterministic target mask ``T`` is chosen at step ``start``; from ``start`` to ``end``
    every training forward pass uses a fresh Bernoulli sample

    .. math:: \tilde w_i = w_i\,[\,T_i \lor (u_i < p_i(t))\,], \quad p_i(t) = b_i\, f(t),\ u_i \sim U[0,1)

    (DropConnect-style: only the target weights and the sampled ones take part and get a
    gradient; the others keep their values). Validation, test and prediction use ``w * T``.
    At ``end`` the excluded weights and their optimizer state are zeroed and from then on
    the network is static sparse with the hard masks ``T``, exactly as :class:`Static` or a
    finished :class:`GMP`. Before ``start`` (when ``start > 0``) the network trains dense.

    Args:
        sparsity: sparsity of the target in [0, 1); required unless ``target="from_checkpoint"``
            (where the masks define it; a given value must agree within 0.5 %).
        target: ``magnitude`` (largest ``|w|`` at ``start`` under ``distribution``), ``random``
            (positions drawn with the callback's seeded generator, exact per-layer counts), or
            ``from_checkpoint`` (the masks in ``masks``, e.g. another method's final masks).
        masks: for ``from_checkpoint``: ``{target name: bool tensor}``, a file written with
            ``torch.save`` (a lottery level's ``masks.pt``) or a sparsetrain Lightning checkpoint
            (``.../checkpoints/last.ckpt``: its ``SparsityCallback`` masks are taken).
        distribution: layer budgets for ``magnitude`` / ``random``: ``uniform``, ``global``,
            ``erk``, ``er`` (see :func:`sparsetrain.core.budget_masks`); ``power``, ``overrides``
            as in :class:`GMP`.
        initial_probability: ``tau0`` in [0, 1].
        probabilities: ``constant`` (``b_i = tau0`` for every excluded weight) or ``random``
            (``b_i ~ U[0, tau0)`` per weight, drawn once at ``start`` with the callback's
            seeded generator and kept in checkpoints).
        schedule: the curve ``f`` from 1 at ``start`` to exactly 0 at ``end``: ``linear``,
            ``cosine`` or ``exponential`` (``(e^{-rate x} - e^{-rate}) / (1 - e^{-rate})``, see
            :func:`sparsetrain.core.stochastic.annealing_scale`).
        rate: decay rate of ``exponential`` (> 0).
        start, end: first stochastic forward and the step at which the masks become hard; an
            int counts optimizer steps, a float in (0, 1] is a fraction of training.
        structure, indivisible, nm_layout: an ``"N:M"`` target for ``magnitude`` / ``random`` (with
            ``distribution="uniform"`` and ``sparsity = 1 - N/M``), as in :class:`Static`.

    Steps: the forward pass that leads to optimizer step ``t + 1`` runs at step ``t``
    (``trainer.global_step == t``) and uses ``p(t)``; so the first stochastic forward uses
    ``tau0`` and the last one (at ``end - 1``) a small positive value. With ``start == end``
    the method is one-shot pruning at ``start`` (no stochastic phase).

    Example (fine-tune a trained dense model into a 95 %-sparse one)::

        model.load_state_dict(torch.load("dense.ckpt")["state_dict"])
        cb = SparsityCallback(StochasticAnnealing(0.95, initial_probability=0.5, end=0.5))
        L.Trainer(max_epochs=20, callbacks=[cb]).fit(model, datamodule)
    """

    def __init__(
        self,
        sparsity: float | None = None,
        target: str = "magnitude",
        distribution: str = "uniform",
        initial_probability: float = 0.5,
        probabilities: str = "constant",
        schedule: str = "linear",
        start: int | float = 0,
        end: int | float = 0.5,
        rate: float = 5.0,
        masks: Mapping[str, Tensor] | str | Path | None = None,
        power: float = 1.0,
        overrides: Mapping[str, float] | None = None,
        overrides_mode: str = "exact",
        structure: str | None = None,
        indivisible: str = "dense",
        nm_layout: str = "channels",
    ):
        self.target = check_choice(target, "target", TARGETS)
        self.probabilities = check_choice(probabilities, "probabilities", PROBABILITIES)
        self.schedule = check_choice(schedule, "schedule", ANNEALING_SCHEDULES)
        self.initial_probability = check_number(initial_probability, "initial_probability", 0.0, 1.0)
        self.rate = check_number(rate, "rate", 0.0, low_open=True, meaning="decay rate of schedule='exponential'")
        self.updates = UpdateSchedule(start, end, every=None)  # the target is chosen at start, hard at end

        self._masks: Masks | None = None
        if target == "from_checkpoint":
            if masks is None:
                raise SparsityConfigError(
                    "target='from_checkpoint' needs masks=: a checkpoint of a sparse run, a masks file or a dict"
                )
            self._masks = load_masks(masks)
            total = sum(m.numel() for m in self._masks.values())
            measured = 1.0 - sum(int(m.sum()) for m in self._masks.values()) / max(total, 1)
            if sparsity is not None and abs(check_sparsity(sparsity) - measured) > 0.005:
                where = masks if isinstance(masks, (str, Path)) else "masks="
                raise SparsityConfigError(
                    f"sparsity={sparsity} disagrees with the masks from {where}, which are {measured:.4f} sparse; "
                    "leave sparsity=None to take it from the masks"
                )
            sparsity = measured
        else:
            if masks is not None:
                raise SparsityConfigError(f"masks= is only used with target='from_checkpoint', not target={target!r}")
            if sparsity is None:
                raise SparsityConfigError(f"sparsity is required with target={target!r} (a number in [0, 1))")
        self.sparsity = check_sparsity(sparsity)
        self.masks = str(masks) if isinstance(masks, (str, Path)) else (None if masks is None else "<dict>")
        self.budget = Budget(distribution, power, overrides, overrides_mode, structure, indivisible, nm_layout)
        if structure is not None and target == "from_checkpoint":
            raise SparsityConfigError("structure= is for target='magnitude' or 'random'; with target='from_checkpoint' the masks decide")
        self.budget.check_final(self.sparsity)
        self._base: dict[str, Tensor] | None = None  # b_i per target, set at `start`

    # ------------------------------------------------------------ schedule
    @property
    def _start(self) -> int | None:
        return None if self._steps is None else self._steps.start

    @property
    def _end(self) -> int | None:
        return None if self._steps is None else self._steps.end

    def scale(self, step: int) -> float:
        """``f(t)``: 1 at ``start``, exactly 0 from ``end`` on, along ``schedule``."""
        return annealing_scale(step, self._start, self._end, self.schedule, self.rate)

    def inclusion_probability(self, step: int) -> float:
        """``tau0 * f(t)``: the probability of every excluded weight (``constant``), the upper end of
        their range (``random``); 1.0 before ``start`` (dense), exactly 0.0 from ``end`` on."""
        if step < self._start:
            return 1.0
        return self.initial_probability * self.scale(step)

    def target_sparsity(self, step: int) -> float:
        return 0.0 if self._start is None or step < self._start else self.sparsity

    # --------------------------------------------------------------- masks
    def init_masks(self, ctx: SparsityContext) -> Masks:
        if self._start == 0:
            return self._begin(ctx)
        self._base = None  # a new run (the same method on a new model too): its target is chosen at `start`
        return {n: torch.ones_like(p, dtype=torch.bool) for n, p in ctx.params.items()}  # dense until start

    @torch.no_grad()
    def update(self, ctx: SparsityContext, step: int, grads=None) -> Masks | None:
        if self._base is None:  # step == start > 0: choose the target
            return self._begin(ctx)
        if step == self._end:  # same masks; the callback now zeroes the excluded weights and their state
            return {n: m.clone() for n, m in ctx.masks.items()}
        return None

    def _begin(self, ctx: SparsityContext) -> Masks:
        if self.target == "from_checkpoint":
            masks = self._check_masks(ctx)
        else:
            if self.target == "magnitude":
                scores = magnitude_scores(ctx.params, ctx.masks)
            else:
                scores = initial_random_scores(ctx.params, ctx.generator)
            masks = self.budget.masks(scores, self.sparsity, layouts=ctx.layouts)
        tau0 = self.initial_probability
        if self.probabilities == "random":
            self._base = {
                n: (torch.rand(p.shape, generator=ctx.generator) * tau0).to(p.device) for n, p in ctx.params.items()
            }
        else:
            self._base = {n: torch.tensor(tau0, dtype=torch.float32, device=p.device) for n, p in ctx.params.items()}
        return {n: m.to(ctx.params[n].device) for n, m in masks.items()}

    def _check_masks(self, ctx: SparsityContext) -> Masks:
        masks = self._masks
        if list(masks) != list(ctx.params) or any(masks[n].shape != p.shape for n, p in ctx.params.items()):
            raise SparsityConfigError(
                f"StochasticAnnealing(target='from_checkpoint') has masks for "
                f"{[(n, tuple(m.shape)) for n, m in masks.items()][:4]}... but the callback's targets are "
                f"{[(n, tuple(p.shape)) for n, p in ctx.params.items()][:4]}...; use the same model and the same "
                "include/exclude/dense_first/dense_last as the run that made the masks"
            )
        return dict(masks)

    # ---------------------------------------------------- stochastic phase
    def stochastic(self, step: int) -> bool:
        return self._base is not None and self._start <= step < self._end

    def forward_probabilities(self, ctx: SparsityContext, step: int) -> tuple[dict[str, Tensor], float]:
        for n, p in ctx.params.items():  # after a resume the base lives on the CPU: move it once
            if self._base[n].device != p.device:
                self._base[n] = self._base[n].to(p.device)
        return self._base, self.scale(step)

    # ---------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        base = None if self._base is None else {n: b.detach().cpu() for n, b in self._base.items()}
        return {"base": base, "start_step": self._start, "end_step": self._end}

    def load_state_dict(self, state: dict) -> None:
        self._base = state["base"]
        if self._steps is None:  # evaluation without setup (trainer.test(ckpt_path=...)): the saved schedule
            self._steps = UpdateSchedule(state["start_step"], state["end_step"], every=None)

    def hparams(self) -> dict:
        return {k: v for k, v in super().hparams().items() if v is not None and v != {}}

    @torch.no_grad()
    def final_masks(self, ctx: SparsityContext) -> Masks:
        """Hard target masks now (a fit that stopped while annealing); chosen first if before ``start``."""
        return self._begin(ctx) if self._base is None else {n: m.clone() for n, m in ctx.masks.items()}
