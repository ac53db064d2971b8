"""What DDP does with uneven data: two CPU ranks (gloo), ``use_distributed_sampler=False``, rank 0 with
3 batches per epoch and rank 1 with 4, 2 epochs. Prints every rank's steps and epoch ends::

    python experiments/uneven_ddp.py          # dense
    python experiments/uneven_ddp.py sparse   # with SparsityCallback(Static(0.5))

Seen here (torch 2.14.1, Lightning 2.6.6, gloo), dense and sparse alike: no error at the epoch
boundary; rank 1's 4th backward all-reduce is paired with rank 0's first backward of epoch 2 (the
gradients of different steps are averaged), rank 0 finishes first and returns, rank 1 then fails
with "Connection closed by peer", and the launching process exits 0. See docs/distributed.md.
"""

from __future__ import annotations

import os
import sys

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        rank = int(os.environ.get("LOCAL_RANK", 0))
        n = 24 if rank == 0 else 32  # 3 batches of 8 on rank 0, 4 on rank 1
        g = torch.Generator().manual_seed(rank)
        data = TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
        return DataLoader(data, batch_size=8)


class Trace(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        print(f"rank {trainer.global_rank}: step {trainer.global_step}", flush=True)

    def on_train_epoch_end(self, trainer, *args):
        print(f"rank {trainer.global_rank}: end of epoch {trainer.current_epoch}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    callbacks = [Trace()]
    if sys.argv[1:] == ["sparse"]:
        from sparsetrain import SparsityCallback
        from sparsetrain.methods import Static

        callbacks.append(SparsityCallback(Static(sparsity=0.5)))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, use_distributed_sampler=False,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    trainer.fit(Net())
    print(f"rank {trainer.global_rank}: fit returned", flush=True)
