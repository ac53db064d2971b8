"""LightningCLI example: a tiny CNN on scikit-learn's bundled 8x8 digits, made sparse by
``sparsetrain.SparsityCallback`` configured in ``config.yaml`` (see README.md next to this file).

    python examples/cli/train.py fit --config examples/cli/config.yaml
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn

from sparsetrain.apps.data import DigitsDataModule


class DigitsNet(pl.LightningModule):
    """Conv-BN-ReLU-pool and two linear layers on 1x8x8 digits; SGD with momentum.

    Its prunable weights (the default targets of ``SparsityCallback``) are ``conv.weight``,
    ``fc1.weight`` and ``fc2.weight``.
    """

    def __init__(self, width: int = 16, hidden: int = 64, num_classes: int = 10, lr: float = 0.05, momentum: float = 0.9):
        super().__init__()
        self.save_hyperparameters()
        self.conv = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc1 = nn.Linear(width * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    def _step(self, batch, stage: str):
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=stage != "train")
        self.log(f"{stage}/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum, weight_decay=5e-4)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run=True`` run) the CLI; ``args`` as on the command line (``None``: ``sys.argv``)."""
    return LightningCLI(DigitsNet, DigitsDataModule, args=args, run=run, seed_everything_default=0)


if __name__ == "__main__":
    main()
