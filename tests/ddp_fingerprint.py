"""Two CPU processes (Lightning's ``ddp`` strategy, gloo): ``compare_across_ranks`` on masks that agree,
on masks that differ on one rank in one layer, and the old fingerprint on the same masks.

Usage: ``python tests/ddp_fingerprint.py OUT_DIR``. Lightning re-launches this script for rank 1;
each rank writes ``OUT_DIR/rank{r}.json``.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsetrain.core.fingerprint import compare_across_ranks, mask_hashes  # noqa: E402
from tests.helpers import TinyNet, random_loader  # noqa: E402
from tests.test_fingerprint import old_fingerprint  # noqa: E402


def masks_for(rank: int) -> list[torch.Tensor]:
    """Four layers, identical on both ranks except layer 2: {0, 3} on rank 0, {1, 2} on rank 1."""
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(shape, generator=g) < 0.3 for shape in [(8, 1, 3, 3), (32, 128), (4,), (10, 32)]]
    masks[2] = torch.zeros(4, dtype=torch.bool)
    masks[2][[0, 3] if rank == 0 else [1, 2]] = True
    return masks


class Compare(L.Callback):
    def __init__(self, out):
        self.out = Path(out)

    def on_fit_start(self, trainer, pl_module):
        rank, strategy = trainer.global_rank, trainer.strategy
        same = masks_for(0)
        differ = masks_for(rank)
        old = torch.stack([old_fingerprint(m) for m in differ])
        gathered = strategy.all_gather(old)
        result = {
            "world_size": trainer.world_size,
            "agree": compare_across_ranks(mask_hashes(same), strategy),
            "differ": compare_across_ranks(mask_hashes(differ), strategy),
            "hashes": mask_hashes(differ).tolist(),
            "old_scheme_sees_a_difference": not bool((gathered == gathered[0]).all()),
        }
        (self.out / f"rank{rank}.json").write_text(json.dumps(result))
        trainer.should_stop = True


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = sys.argv[1]
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Compare(out)],
    )
    trainer.fit(TinyNet(), random_loader(n=32, batch_size=8))
