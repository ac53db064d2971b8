"""SR-STE (Zhou et al. 2021, "Learning N:M fine-grained structured sparse neural networks from scratch")."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from sparsetrain.core.budgets import Budget
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.masks import Masks, magnitude_scores
from sparsetrain.core.schedules import UpdateSchedule
from sparsetrain.core.validation import check_number
from sparsetrain.methods.base import SparsityContext, SparsityMethod, register_method


@register_method("srste", supports=("structure", "soft_masks"))
class SRSTE(SparsityMethod):
    r"""Train N:M sparse from scratch: dense weights, N:M-masked forwards, a decay on the pruned weights.

    The weights stay dense. Every forward of training computes with :math:`\tilde W = W \odot E`,
    where the mask :math:`E` keeps the ``N`` largest ``|w|`` of every group of ``M`` along the
    input dim (recomputed from the dense weights after every ``every`` optimizer steps), and the
    optimizer steps the dense weights with the sparse-refined straight-through gradient

    .. math:: W_{t+1} = W_t - \gamma_t \left( \nabla_{\tilde W} L(\tilde W_t) + \lambda_W\, (\bar E_t \odot W_t) \right)

    (``decay`` is :math:`\lambda_W`, the paper's default ``2e-4``; ``decay=0`` is plain STE). The
    gradient of the masked weight reaches every dense weight, so a pruned weight keeps learning and
    takes its place back when it outgrows a kept one; the decay pulls pruned weights towards 0,
    which stabilises the mask. Evaluation (validation, test) sees ``W * E``. At ``end`` (default:
    the last step) the mask is made hard: pruned weights and their optimizer state become 0, and
    the model is exactly N:M (:class:`Static` from then on).

    Args:
        structure: ``"N:M"`` (required; e.g. ``"2:4"``); the sparsity is ``1 - N/M``.
        decay: :math:`\lambda_W` >= 0.
        every: optimizer steps between mask recomputations (1 = every step, as in the paper).
        end: the step at which the mask becomes hard (int steps or a fraction of training).
        indivisible: layers whose input size is not a multiple of ``M``: ``dense`` (default),
            ``unstructured`` (the top ``1 - N/M`` of the layer's ``|w|``, same forward) or ``error``.
        nm_layout: how a convolution's groups run: ``channels`` (default) or ``flat``, as in :class:`Static`.
        overrides: per-layer sparsity by glob; such layers leave the structure (unstructured top-k).
        sparsity: ``None`` (taken from the structure) or ``1 - N/M``; any other value fails.

    Example::

        SparsityCallback(SRSTE("2:4", decay=2e-4))
    """

    straight_through = True

    def __init__(
        self,
        structure: str = "2:4",
        decay: float = 2e-4,
        every: int | float = 1,
        end: int | float = 1.0,
        indivisible: str = "dense",
        overrides: Mapping[str, float] | None = None,
        sparsity: float | None = None,
        nm_layout: str = "channels",
    ):
        if structure in (None, "unstructured"):
            raise SparsityConfigError(f"structure={structure!r}: SR-STE needs an 'N:M' structure, e.g. '2:4'")
        self.budget = Budget(
            "uniform", overrides=overrides, overrides_mode="outside", structure=structure, indivisible=indivisible, nm_layout=nm_layout
        )
        self.sparsity = self.budget.nm.sparsity
        if sparsity is not None:
            self.budget.check_final(sparsity)
        self.decay = check_number(decay, "decay", 0.0, meaning="SR-STE's lambda_W, the decay of the pruned weights")
        self.updates = UpdateSchedule(0, end, every)

    def _masks(self, ctx: SparsityContext) -> Masks:
        return self.budget.masks(magnitude_scores(ctx.params), self.sparsity, layouts=ctx.layouts)

    def init_masks(self, ctx: SparsityContext) -> Masks:
        return self._masks(ctx)

    @torch.no_grad()
    def update(self, ctx: SparsityContext, step: int, grads=None) -> Masks:
        return self._masks(ctx)

    @torch.no_grad()
    def final_masks(self, ctx: SparsityContext) -> Masks:
        return self._masks(ctx)

    def stochastic(self, step: int) -> bool:
        """Soft masks (dense weights, masked forwards) before ``end``; hard from ``end`` on."""
        return self._steps is not None and step < self._steps.end

    @torch.no_grad()
    def regularize_(self, weights: list[Tensor], grads: list[Tensor], masks: list[Tensor]) -> None:
        """``grad += decay * (~mask) * w``: the sparse-refined term on the pruned weights."""
        if self.decay > 0:
            for w, g, m in zip(weights, grads, masks):
                g.add_(w * (~m).view(torch.uint8), alpha=self.decay)
