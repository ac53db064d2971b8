"""What :class:`~sparsetrain.SparsityCallback` needs to know about Lightning's own components.

* :func:`averaged_copies`: the weight copies that Lightning's weight averaging keeps (``WeightAveraging``,
  ``EMAWeightAveraging``, ``StochasticWeightAveraging``); the engine masks them with the model, so the averaged
  model that is validated, checkpointed and finally copied into the model holds the masks exactly.
* :class:`SparsityModelCheckpoint`: a ``ModelCheckpoint`` whose best (top-k) checkpoints are chosen only among
  those saved at the final sparsity with hard masks, so that ``ckpt_path="best"`` is a sparse model.
* :func:`check_strategy`: the strategies that cannot hold per-weight masks, refused at fit start.
* :func:`grad_scaling`: what ``GradScaler`` (``precision="16-mixed"``) does to the step about to be made.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from sparsetrain.core.errors import SparsityConfigError

try:  # Lightning >= 2.6 (EMAWeightAveraging is a subclass)
    from lightning.pytorch.callbacks import WeightAveraging

    AVERAGING: tuple[type, ...] = (WeightAveraging, StochasticWeightAveraging)
except ImportError:
    AVERAGING = (StochasticWeightAveraging,)


def averaged_copies(trainer: pl.Trainer) -> list[nn.Module]:
    """The modules in which Lightning's weight-averaging callbacks keep their average (same parameter names as
    the LightningModule)."""
    copies = []
    for callback in trainer.callbacks:
        model = getattr(callback, "_average_model", None) if isinstance(callback, AVERAGING) else None
        if model is not None:
            copies.append(model.module if isinstance(model, AveragedModel) else model)
    return copies


def other_callbacks(trainer: pl.Trainer, this) -> list[str]:
    """Class names of the trainer's other callbacks: the components that may have written the weights."""
    return [type(c).__name__ for c in trainer.callbacks if c is not this]


def check_strategy(trainer: pl.Trainer) -> None:
    strategy = type(trainer.strategy).__name__
    if strategy in ("FSDPStrategy", "DeepSpeedStrategy"):
        raise SparsityConfigError(
            f"strategy={strategy} is not supported: it flattens the parameters into shards of its own, so masks, counts "
            "and selections would be per shard. Allowed: single-device, DDP ('ddp', 'ddp_spawn', multi-node) and FSDP2 "
            "through ModelParallelStrategy(tensor_parallel_size=1) with fully_shard in configure_model(); see docs/distributed.md"
        )


def sparsity_callbacks(trainer: pl.Trainer) -> list:
    from sparsetrain.callback import SparsityCallback

    return [c for c in trainer.callbacks if isinstance(c, SparsityCallback)]


class SparsityModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that considers a checkpoint for its best ``save_top_k`` only once every
    ``SparsityCallback`` of the Trainer is at its method's final sparsity with hard masks.

    With ``monitor="val/acc"`` and a plain ``ModelCheckpoint``, the best score usually comes from the middle of a
    pruning schedule, where the model is denser (GMP) or its masks are still soft (SR-STE, annealing), and
    ``trainer.test(ckpt_path="best")`` evaluates that denser model. This class takes the same arguments; before
    the schedules end it writes only ``last.ckpt`` (with ``save_last``); without ``monitor`` it is a plain
    ``ModelCheckpoint`` (the latest checkpoints). Methods that
    hold their sparsity from the start (Static, RigL, SET) are at their final sparsity from the first step.
    """

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        if self.monitor is None or all(c.engine.at_final_sparsity() for c in sparsity_callbacks(trainer)):
            super()._save_topk_checkpoint(trainer, monitor_candidates)


def grad_scaling(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, check_inf: bool) -> tuple[torch.Tensor | float, bool]:
    """``(factor, skipped)`` for the step ``optimizer`` is about to make, seen from ``on_before_optimizer_step``.

    ``factor``: the loss scale the gradients still carry. Lightning unscales them before that hook, except for an
    optimizer that unscales inside its own step (``fused=True``): then the scale. ``skipped``: GradScaler found
    inf/NaN gradients and will not step (Lightning counts the step all the same); read from the unscaling
    Lightning did, or for a fused optimizer checked now when ``check_inf`` (one pass over its gradients).
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0, False
    fused = getattr(optimizer, "_step_supports_amp_scaling", False)
    if not check_inf:
        found = {}
    elif fused:
        found = scaler._check_inf_per_device(optimizer)
    else:
        found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    skipped = any(bool(v.item()) for v in found.values())
    return (scaler._scale if fused else 1.0), skipped
