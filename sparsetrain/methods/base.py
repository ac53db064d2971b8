"""The interface every sparsity method implements.

A method never touches modules or optimizers: it receives the targets (``{name: weight}``),
the current masks and, when it asked for them, the dense gradients, and returns new masks.
:class:`sparsetrain.SparsityCallback` applies them (weights, gradients, optimizer state).

Steps are optimizer steps: step ``t`` is the moment right after the ``t``-th optimizer step
(Lightning's ``trainer.global_step``), and step ``0`` is fit start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparsetrain.core.masks import Masks


@dataclass
class SparsityContext:
    """What a method may look at: targets, current masks, the length of training and a seeded RNG."""

    params: dict[str, Tensor]
    masks: Masks | None
    total_steps: int | None
    generator: torch.Generator


class SparsityMethod:
    """Base class: dense, never updates. Subclasses override what they need."""

    #: target sparsity used before the method has reported one
    sparsity: float = 0.0
    #: extra numbers about the last update (e.g. ``{"rigl/drop_fraction": 0.3}``), logged by the callback
    last_metrics: dict[str, float] = {}

    def setup(self, total_steps: int | None) -> None:
        """Resolve fractions of training into steps and validate; called at fit start."""

    def init_masks(self, ctx: SparsityContext) -> Masks | None:
        """Masks at fit start (``None``: no masks, the model stays dense)."""
        return None

    def is_update_step(self, step: int) -> bool:
        """Whether :meth:`update` runs after optimizer step ``step`` (``0``: at fit start)."""
        return False

    def needs_grads(self, step: int) -> bool:
        """Whether the update after step ``step`` needs the dense gradients of that step."""
        return False

    def update(self, ctx: SparsityContext, step: int, grads: dict[str, Tensor] | None) -> Masks | None:
        """New masks after step ``step``, or ``None`` for no change."""
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

    def target_sparsity(self, step: int) -> float:
        """The sparsity the method aims at after step ``step`` (reported next to the measured one)."""
        return self.sparsity

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "last_metrics")
        return f"{type(self).__name__}({args})"
