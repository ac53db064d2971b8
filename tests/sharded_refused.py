"""FSDP2 (``fully_shard`` in ``configure_model``) through Lightning's ModelParallelStrategy, one CPU process.

Usage: ``python tests/sharded_refused.py METHOD``: a method that swaps weights at every forward (``annealing``,
``srste``) exits with the callback's error at fit start. Run as a subprocess by tests/test_sharded.py (the strategy
initialises a process group)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch import nn  # noqa: E402

from sparsetrain import SparsityCallback  # noqa: E402
from tests.helpers import random_loader  # noqa: E402


class ShardedNet(L.LightningModule):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)
        fully_shard(self.fc1, mesh=self.device_mesh["data_parallel"])
        fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[SparsityCallback(sys.argv[1], sparsity=0.5, end=2)])
    trainer.fit(ShardedNet(), random_loader())
    print("TRAINED")
