"""Run a two-process CPU DDP fit (Lightning's ``ddp`` strategy, gloo) and save every rank's masks.

Usage: ``python tests/ddp_masks.py OUT_DIR METHOD`` with METHOD one of the names in ``METHODS``.
Lightning re-launches this script for rank 1; each rank trains on its own half of the data
(Lightning's DistributedSampler) and writes ``OUT_DIR/rank{r}.pt``.
"""

import os
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsetrain import SparsityCallback  # noqa: E402
from sparsetrain.methods import GMP, SparsityMethod, Static  # noqa: E402
from tests.helpers import TinyNet, random_loader  # noqa: E402

class RankDependent(SparsityMethod):
    """A broken method whose masks depend on the process: the callback must refuse to go on."""

    def init_masks(self, ctx):
        g = torch.Generator().manual_seed(int(os.environ.get("LOCAL_RANK", 0)))
        return {n: torch.rand(p.shape, generator=g) > 0.5 for n, p in ctx.params.items()}


METHODS = {
    "rank_dependent": RankDependent,
    "gmp": lambda: GMP(sparsity=0.8, start=1, end=10, every=3, distribution="global"),
    "static": lambda: Static(sparsity=0.8, distribution="erk"),
}


class SaveMasks(L.Callback):
    def __init__(self, cb, out):
        self.cb, self.out, self.history = cb, Path(out), []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.history.append({n: m.clone() for n, m in self.cb.masks.items()})

    def on_train_end(self, trainer, pl_module):
        torch.save({"history": self.history, "weights": dict(self.cb.targets)}, self.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, method = sys.argv[1], sys.argv[2]
    L.seed_everything(0)
    cb = SparsityCallback(METHODS[method]())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb, SaveMasks(cb, out)],
    )
    trainer.fit(TinyNet(), random_loader(n=128, batch_size=8))
