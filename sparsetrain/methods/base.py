"""The interface every sparsity method implements.

A method never touches modules or optimizers: it receives the targets (``{name: weight}``),
the current masks and, when it asked for them, the dense gradients, and returns new masks.
:class:`sparsetrain.SparsityCallback` applies them (weights, gradients, optimizer state).

Steps are optimizer steps: step ``t`` is the moment right after the ``t``-th optimizer step
(Lightning's ``trainer.global_step``, every optimizer counted), and step ``0`` is fit start.
When a method updates is one shared object, :class:`~sparsetrain.core.schedules.UpdateSchedule`
(``self.updates``, resolved at fit start into ``self._steps``); how a sparsity is shared among
layers is another, :class:`~sparsetrain.core.budgets.Budget` (``self.budget``). A method holds
only its math: what to drop, what to grow, how many.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsetrain.core.budgets import Budget
from sparsetrain.core.layouts import Layout
from sparsetrain.core.masks import Masks
from sparsetrain.core.schedules import UpdateSchedule
from sparsetrain.core.shards import Shards, full_shapes, total_counts


@dataclass
class SparsityContext:
    """What a method may look at: targets, current masks, the length of training and a seeded RNG.

    ``stepped``: the targets that the optimizer step being processed trains (``None``: all). With
    several optimizers (a GAN) or frozen layers included by name, drop-and-grow methods move only
    these: a weight grown where nothing trains it would stay 0 for ever.

    ``shards``: under FSDP2 the params, masks and gradients are this rank's pieces of sharded
    targets (:mod:`sparsetrain.core.shards`); pass ``shards`` to every selection, and take shapes
    and counts from :attr:`shapes` and :meth:`active`, which are those of the whole tensors.

    ``layouts``: how each target enters its layer (:mod:`sparsetrain.core.layouts`, recorded once when the
    targets are chosen): N:M groups run along each target's real input dim. ``None`` (or a target
    without one): the rows of ``weight.reshape(rows, -1)``.
    """

    params: dict[str, Tensor]
    masks: Masks | None
    total_steps: int | None
    generator: torch.Generator
    stepped: frozenset[str] | None = None
    shards: Shards | None = None
    layouts: dict[str, Layout] | None = None

    def trains(self, name: str) -> bool:
        return self.stepped is None or name in self.stepped

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Full shape of every target."""
        return full_shapes(self.params, self.shards)

    def active(self, masks: Masks | None = None) -> dict[str, int]:
        """Active positions of every mask (``ctx.masks`` by default), over all pieces."""
        return total_counts(self.masks if masks is None else masks, self.shards)


#: every method by the name configs and ``SparsityCallback("rigl", ...)`` use, filled by :func:`register_method`
METHODS: dict[str, type[SparsityMethod]] = {}
#: what a method may declare it supports
CAPABILITIES = ("structure", "sharding", "gradients", "soft_masks")


def register_method(name: str, supports: tuple[str, ...] = ()):
    """Class decorator at a method's definition: make it available as ``name`` and declare what it supports.

    ``supports``: ``structure`` (takes ``structure="N:M"``), ``sharding`` (its selections are exact on FSDP2-sharded
    pieces, tested; a method with ``soft_masks`` is refused under sharding),
    ``gradients`` (its updates read the dense gradients), ``soft_masks`` (stochastic or straight-through
    forwards before its masks turn hard). Error messages list the methods from here, never by hand.
    """
    unknown = set(supports) - set(CAPABILITIES)
    if unknown or name in METHODS:
        raise ValueError(f"register_method({name!r}): unknown capabilities {sorted(unknown)} or a name taken twice")

    def register(cls: type[SparsityMethod]) -> type[SparsityMethod]:
        cls.name, cls.supports = name, frozenset(supports)
        METHODS[name] = cls
        return cls

    return register


def methods_supporting(capability: str) -> list[str]:
    """The class names of the registered methods that support ``capability``, e.g. for an error message."""
    return [cls.__name__ for cls in METHODS.values() if capability in cls.supports]


class SparsityMethod:
    """Base class: dense, never updates. Subclasses override what they need."""

    #: the registered name (:func:`register_method`) and what the method supports
    name: str = ""
    supports: frozenset[str] = frozenset()

    #: target sparsity used before the method has reported one (and the one reached at the end)
    sparsity: float = 0.0
    #: extra numbers about the last update (e.g. ``{"rigl/drop_fraction": 0.3}``), logged by the callback
    last_metrics: dict[str, float] = {}
    #: when the method updates its masks (``None``: never)
    updates: UpdateSchedule | None = None
    #: ``self.updates`` resolved in optimizer steps of this fit (set by :meth:`setup`)
    _steps: UpdateSchedule | None = None
    #: how the sparsity is shared among layers (``None``: the method has no layer budget)
    budget: Budget | None = None

    def setup(self, total_steps: int | None) -> None:
        """Resolve fractions of training into steps and validate; called at fit start."""
        if self.updates is not None:
            self._steps = self.updates.resolve(total_steps)

    def check(self, shapes: dict[str, tuple[int, ...]], layouts: dict[str, Layout] | None = None) -> None:
        """Fail now, at fit start, if the configuration cannot work on targets of these shapes (and layouts)."""
        if self.budget is not None:
            self.budget.check(shapes, self.sparsity, layouts=layouts)

    def init_masks(self, ctx: SparsityContext) -> Masks | None:
        """Masks at fit start (``None``: no masks, the model stays dense)."""
        return None

    def is_update_step(self, step: int) -> bool:
        """Whether :meth:`update` runs after optimizer step ``step`` (never at fit start, step 0)."""
        return self._steps is not None and self._steps.is_update_step(step)

    def needs_grads(self, step: int) -> bool:
        """Whether the update after step ``step`` needs the dense gradients of that step."""
        return False

    def skips_optimizer_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` is skipped (its gradient only feeds the update; RigL's TF reference)."""
        return False

    def update(self, ctx: SparsityContext, step: int, grads: dict[str, Tensor] | None) -> Masks | None:
        """New masks after step ``step``, or ``None`` for no change.

        ``grads`` holds the dense gradients of the targets that really got one at this step
        (see :attr:`SparsityContext.stepped`); targets without one are not in it.
        """
        return None

    def final_masks(self, ctx: SparsityContext) -> Masks | None:
        """Masks at the end of the schedule, computed now (``SparsityCallback(finalize="prune")``
        after a fit that stopped early); ``None``: the masks already hold the final sparsity."""
        return None

    def stochastic(self, step: int) -> bool:
        """Whether the training forwards after step ``step`` sample stochastic masks.

        While this is true (stochastic subnetwork annealing), the callback calls
        :meth:`forward_probabilities` and, instead of zeroing weights and gradients outside the
        masks, swaps sampled masked weights into the model for every training forward (and
        the target-masked weights for evaluation). Hard-mask methods keep the default ``False``.
        """
        return False

    def forward_probabilities(self, ctx: SparsityContext, step: int) -> tuple[dict[str, Tensor], float]:
        """``(base, scale)``: a weight outside the masks is included with probability ``base[name] * scale``.

        ``base[name]`` is a float32 tensor on the target's device, 0-dim or shaped like the
        weight. Called only while :meth:`stochastic` is true.
        """
        raise TypeError(f"{type(self).__name__} has no stochastic masks (its stochastic() is never true)")

    #: while the masks are soft (:meth:`stochastic`), forwards see ``w * mask`` with a straight-through
    #: gradient (the dense weight gets the gradient of the masked one: SR-STE) instead of sampled masks
    straight_through: bool = False

    def regularize_(self, weights: list[Tensor], grads: list[Tensor], masks: list[Tensor]) -> None:
        """Change the gradients in place before an optimizer step while the masks are soft (SR-STE's decay)."""

    def target_sparsity(self, step: int) -> float:
        """The sparsity the method aims at after step ``step`` (reported next to the measured one)."""
        return self.sparsity

    def final_kept(self, shapes: dict[str, tuple[int, ...]], layouts: dict[str, Layout] | None = None) -> int:
        """How many weights the targets keep once the schedule is done (the budget's count, which an
        N:M structure with dense indivisible layers or ``overrides_mode="outside"`` moves off ``1 - sparsity``)."""
        if self.budget is not None and self.budget.distribution != "global":
            return self.budget.kept(shapes, self.sparsity, layouts)
        return round((1.0 - self.sparsity) * sum(math.prod(s) for s in shapes.values()))

    def uses_fractions(self) -> bool:
        """Whether a step of the configuration is a fraction of training (needs its length)."""
        return any(s.uses_fractions for s in vars(self).values() if isinstance(s, UpdateSchedule))

    def hparams(self) -> dict:
        """The constructor arguments and their values, under the names the user wrote.

        Saved in checkpoints (a resume with other values fails, see
        ``SparsityCallback(on_config_change=...)``), shown by ``repr`` and loggable as is.
        """
        found: dict = {}
        for key, value in vars(self).items():
            if key.startswith("_"):
                continue
            if isinstance(value, UpdateSchedule):
                found.update(zip(value.names, (value.start, value.end, value.every)))
            elif isinstance(value, Budget):
                found.update(value.args())
            elif key != "last_metrics":
                found[key] = value
        names = [n for n in inspect.signature(type(self).__init__).parameters if n not in ("self", "args", "kwargs")]
        return {n: found[n] for n in names if n in found}

    @classmethod
    def defaults(cls) -> dict:
        """The constructor's default values (what a checkpoint from before an argument existed ran with)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"
