"""Boolean masks: building them (random, top-k by score) and applying them in place.

A mask is a ``torch.bool`` tensor shaped like its weight (1 byte per weight); ``True`` keeps.
Application is one in-place multiply per tensor list, done with ``torch._foreach_mul_`` so
that all targets go in one fused call; masked positions become exactly ``0``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from sparsetrain.core.counter_rng import uniform
from sparsetrain.core.kernels import MaskKernel
from sparsetrain.core.select import select
from sparsetrain.core.shards import Shards, local, offsets

Masks = dict[str, Tensor]
_EAGER = MaskKernel("eager")


def random_scores(
    params: Mapping[str, Tensor], generator: torch.Generator, shards: Shards | None = None
) -> dict[str, Tensor]:
    """Uniform scores in ``[0, 1)`` per target, on its device, from counter-based noise (:mod:`.counter_rng`).

    One seed is drawn from ``generator`` per call (same generator state, same scores); the score of a
    weight is then a function of that seed, the target's name and the weight's flat index, so the
    pieces of sharded targets (``shards``) get exactly the scores of the whole tensors.
    """
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    starts = offsets(params, shards)
    return {n: uniform(seed, n, starts[n], p.numel(), p.device).view(p.shape) for n, p in params.items()}


def initial_random_scores(
    params: Mapping[str, Tensor], generator: torch.Generator, shards: Shards | None = None
) -> dict[str, Tensor]:
    """:func:`random_scores` where every position holding a non-zero weight ranks above every zero one.

    The score of a zero weight is ``u - 1`` instead of ``u`` (exact: ``u`` lies on the grid of
    ``2**-24`` in ``[0, 1)``), so the order within each class is the random one. Random initial masks
    drawn from these keep the weights a model already holds when the budget can take them (a model
    that is already sparse keeps its weights; its zeros are chosen last), and are exactly the masks of
    :func:`random_scores` on a model without zeros.
    """
    scores = random_scores(params, generator, shards)
    for n, p in params.items():
        scores[n].sub_((p.detach() == 0).to(torch.float32))
    return scores


def topk_mask(scores: Tensor, keep: int) -> Tensor:
    """Mask of the ``keep`` largest scores (ties: lowest flat index first, see :func:`.select.select`)."""
    return select([scores], [[0]], [keep])[0]


def topk_masks(scores: Mapping[str, Tensor], counts: Mapping[str, int], shards: Shards | None = None) -> Masks:
    """Per-layer top-k: layer ``n`` keeps its ``counts[n]`` largest scores (over all pieces when ``shards``)."""
    names = list(scores)
    masks = select([scores[n] for n in names], [[i] for i in range(len(names))], [counts[n] for n in names], shards)
    return dict(zip(names, masks))


def global_topk_masks(scores: Mapping[str, Tensor], keep: int, shards: Shards | None = None) -> Masks:
    """One threshold over all layers: the ``keep`` largest scores across every target survive.

    No concatenation: the threshold search reads each layer where it lies (:func:`.select.select`).
    """
    names = list(scores)
    return dict(zip(names, select([scores[n] for n in names], [list(range(len(names)))], [keep], shards)))


def magnitude_scores(params: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``|w|`` as float32; positions outside ``masks`` get ``-inf`` so they are never chosen to keep.

    A NaN or infinite weight scores ``-1``, below every finite ``|w|``: the least important
    (pruned first), but still above the masked-out positions.
    """
    scores = {}
    for n, p in params.items():
        s = p.detach().abs().float().nan_to_num_(nan=-1.0, posinf=-1.0)
        if masks is not None and n in masks:
            s = s.masked_fill(~masks[n], float("-inf"))
        scores[n] = s
    return scores


def apply_masks_(tensors: Iterable[Tensor | None], masks: Iterable[Tensor]) -> None:
    """``t *= mask`` in place for every pair in one fused ``foreach`` call; ``None`` entries are skipped.

    :class:`sparsetrain.core.kernels.MaskKernel` is the same with a compiled option.
    """
    _EAGER(tensors, masks)


#: optimizers whose step leaves a weight at exactly 0 when its gradient and its state are 0
#: (momentum, Adam moments, accumulators: every update term is a multiple of them, and
#: weight decay, coupled or decoupled, is a multiple of the weight itself).
ZERO_PRESERVING_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
    torch.optim.Adadelta,
)


def keeps_masked_weights_zero(optimizer: torch.optim.Optimizer) -> bool:
    """True for the exact classes in :data:`ZERO_PRESERVING_OPTIMIZERS` (subclasses may change ``step``)."""
    return type(optimizer) in ZERO_PRESERVING_OPTIMIZERS


def reset_optimizer_state_(optimizer: torch.optim.Optimizer, params: Iterable[Tensor], keep: Iterable[Tensor]) -> int:
    """Multiply every state tensor shaped like its parameter (momentum, Adam moments, ...) by ``keep``.

    Works for any ``torch.optim`` optimizer whose per-parameter state holds tensors of the
    parameter's shape; other state entries (step counters, factored statistics) are left alone.
    Sharded parameters (DTensors) take ``keep`` shaped like their local piece, and so does their state.
    Returns how many state tensors were touched.
    """
    touched = 0
    for p, k in zip(params, keep):
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, Tensor) and value.shape == p.shape:
                local(value).mul_(k)
                touched += 1
    return touched

