"""Tiny models and data shared by the tests."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset


class TinyNet(L.LightningModule):
    """Conv + BatchNorm + two Linear layers on 1x8x8 inputs; optimizer chosen by name."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.05):
        super().__init__()
        self.optimizer_name, self.lr = optimizer, lr
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr * 0.1, weight_decay=0.05)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-3)


def random_loader(n: int = 128, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """A fixed data set in a fixed order (no shuffling): the order never depends on the global RNG."""
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def straight_and_resumed(make_callback, tmp_path: Path, warns_at_half: bool = True):
    """Trains TinyNet 4 epochs straight, then 2 epochs with a checkpoint and a fresh Trainer resumed to 4.

    Returns ``(straight_model, straight_callback, resumed_model, resumed_callback)``; the
    checkpoint is ``tmp_path / "last.ckpt"``. ``warns_at_half``: the 2-epoch run warns that
    the schedule reaches beyond training (it was set for 4).
    """

    def run(epochs, ckpt_path=None, dirpath=None):
        L.seed_everything(0)
        model, cb = TinyNet(), make_callback()
        callbacks = [cb] + ([ModelCheckpoint(dirpath=dirpath, save_last=True)] if dirpath else [])
        t = trainer(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=dirpath is not None)
        with pytest.warns(UserWarning, match="beyond") if (warns_at_half and epochs == 2) else nullcontext():
            t.fit(model, random_loader(), ckpt_path=ckpt_path)
        return model, cb

    straight, cb_straight = run(4)
    run(2, dirpath=tmp_path)
    resumed, cb_resumed = run(4, ckpt_path=tmp_path / "last.ckpt")
    return straight, cb_straight, resumed, cb_resumed
