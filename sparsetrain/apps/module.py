"""Image classification LightningModule: cross-entropy, accuracy, optimizer and LR schedule from config."""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("none", "cosine", "step", "multistep")


class ClassificationModule(pl.LightningModule):
    """Wraps a classifier ``net``; logs ``train/loss``, ``train/acc``, ``val/*`` and ``test/*``.

    Args:
        net: the model (any ``nn.Module`` returning logits).
        num_classes: for the accuracy metrics.
        optimizer: ``sgd`` (``momentum``, ``nesterov``, ``weight_decay``) or ``adamw``
            (``betas``, ``weight_decay``).
        lr_schedule: a per-step multiplier of ``lr``: ``none``; ``cosine`` (to 0 at the end of
            training); ``step`` (times ``gamma`` every ``step_size`` epochs); ``multistep``
            (times ``gamma`` at each epoch in ``milestones``).
        warmup: linear warmup from ``lr / warmup_steps`` to ``lr``, in optimizer steps (int) or as
            a fraction of training (float in (0, 1)); combines with every schedule.
        label_smoothing: for the cross-entropy loss.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        betas: Sequence[float] = (0.9, 0.999),
        lr_schedule: str = "cosine",
        warmup: int | float = 0,
        step_size: int = 30,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"module.optimizer={optimizer!r} is unknown; valid choices: {', '.join(OPTIMIZERS)}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"module.lr_schedule={lr_schedule!r} is unknown; valid choices: {', '.join(LR_SCHEDULES)}")
        # plain Python values in the hyperparameters (no OmegaConf lists): checkpoints load with weights_only
        betas, milestones = tuple(float(b) for b in betas), [int(m) for m in milestones]
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes, average="micro") for _ in range(3)
        )

    def configure_model(self):
        """Under ``ModelParallelStrategy`` (``trainer=fsdp``): FSDP2, one ``fully_shard`` unit per Conv/Linear
        (the weights sparsetrain prunes) and one for the rest; nothing under other strategies."""
        if self.device_mesh is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.net.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)
        self._sharded = True

    def forward(self, x):
        return self.net(x)

    def _step(self, batch, stage: str, accuracy: MulticlassAccuracy):
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        accuracy(logits, y)
        train = stage == "train"  # train/loss per step; everything else per epoch
        self.log(f"{stage}/loss", loss, on_step=train, on_epoch=not train, prog_bar=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", self.test_acc)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
            )
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        if hp.lr_schedule == "none" and not hp.warmup:
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        if hp.lr_schedule in ("step", "multistep") and epochs is None:
            raise ValueError(f"module.lr_schedule={hp.lr_schedule!r} counts epochs: set trainer.max_epochs")
        steps_per_epoch = max(1, math.ceil(total / epochs)) if epochs else total
        warmup = int(round(hp.warmup * total)) if isinstance(hp.warmup, float) else int(hp.warmup)
        factor = lr_factor(hp.lr_schedule, total, steps_per_epoch, warmup, hp.step_size, list(hp.milestones), hp.gamma)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_factor(
    schedule: str, total: int, steps_per_epoch: int, warmup: int, step_size: int, milestones: list[int], gamma: float
):
    """The LR multiplier as a function of the optimizer step (for ``LambdaLR``)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        epoch = step // steps_per_epoch
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "step":
            return gamma ** (epoch // step_size)
        if schedule == "multistep":
            return gamma ** sum(epoch >= m for m in milestones)
        return 1.0

    return factor
