"""A sparse FSDP2 fit the way a user writes it: ``fully_shard`` in ``configure_model`` and Lightning's
``ModelParallelStrategy`` on 2 CPU processes (gloo), then the same fit resumed from a sharded checkpoint.

Usage: ``python tests/fsdp_run.py METHOD OUT_DIR [--file]``. Lightning re-launches this script for rank 1.
Fit A trains 12 steps straight and checkpoints at step 6 (a distributed-checkpoint folder, or one file with
``--file``); fit B (new model, new Trainer, same processes) resumes from step 6 to 12. Rank 0 writes
``OUT_DIR/result.json``: zeros per layer counted in the full weights (``full_tensor()``), what the callback
reported, the budget's counts, whether B's weights and masks equal A's bitwise, and mask bytes per rank.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsetrain import SparsityCallback  # noqa: E402
from sparsetrain.methods import GMP, SET, FixedMasks, GraNet, RigL, Static  # noqa: E402
from tests.helpers import random_loader  # noqa: E402

STEPS, HALF = 12, 6


def make_method(name: str):
    fixed = {  # a lottery level's masks, made elsewhere (whole tensors)
        "conv.weight": torch.arange(45).view(5, 1, 3, 3) % 3 != 0,
        "fc1.weight": torch.arange(33 * 180).view(33, 180) % 5 == 0,
        "fc2.weight": torch.arange(330).view(10, 33) % 2 == 0,
    }
    return {
        "static": lambda: Static(0.8, "erk"),
        "gmp": lambda: GMP(0.9, distribution="uniform", start=0, end=8, every=2),
        "gmp_global": lambda: GMP(0.9, distribution="global", start=0, end=8, every=2),
        "rigl": lambda: RigL(0.8, every=2, end=10),
        "set": lambda: SET(0.8, every=2, end=10),
        "granet": lambda: GraNet(0.8, initial_density=0.5, every=2, start=0, end=8, regrowth_end=10),
        "fixed": lambda: FixedMasks(fixed),
        "rigl_2to4": lambda: RigL(0.5, "uniform", every=2, end=10, structure="2:4"),
    }[name]()


class ShardedNet(L.LightningModule):
    """Conv(1 -> 5) and Linear(180 -> 33), (33 -> 10): uneven shards (3/2, 17/16 rows) on 2 ranks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc1, self.fc2 = nn.Conv2d(1, 5, 3), nn.Linear(180, 33), nn.Linear(33, 10)

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        if self.device_mesh is None:  # a plain Trainer (e.g. resuming from a consolidated checkpoint): stay whole
            return
        mesh = self.device_mesh["data_parallel"]
        for m in (self.conv, self.fc1, self.fc2):
            fully_shard(m, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def fit(method_name: str, out: Path, file: bool, ckpt_path=None):
    callback = SparsityCallback(make_method(method_name), seed=3)
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=HALF, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                                     save_distributed_checkpoint=not file),
        max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback, checkpoints], num_sanity_val_steps=0,
    )
    model = ShardedNet()
    trainer.fit(model, random_loader(n=96, batch_size=8), ckpt_path=ckpt_path)
    weights = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    masks = {}  # the callback's mask pieces, gathered into whole masks (for the check only)
    for n, p in callback.targets.items():
        piece = callback.masks[n].to(torch.uint8)
        masks[n] = DTensor.from_local(piece, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride()).full_tensor().bool()
    return trainer, callback, weights, masks


def main(method_name: str, out: Path, file: bool):
    trainer, callback, weights_a, masks_a = fit(method_name, out, file)
    report = callback.sparsity_report()  # a collective under sharding: every rank calls it
    shapes = {n: tuple(p.shape) for n, p in callback.targets.items()}
    mask_bytes = sum(m.numel() * m.element_size() for m in callback.masks.values())
    half = out / "ckpt" / (f"step={HALF}.ckpt")
    _, callback_b, weights_b, masks_b = fit(method_name, out, file, ckpt_path=str(half))
    if trainer.global_rank == 0:
        method = callback.method
        budget = method.budget.counts(shapes, method.sparsity) if method.budget is not None and \
            method.budget.distribution != "global" else None
        result = {
            "zeros": {n: int((weights_a[n] == 0).sum()) for n in shapes},
            "kept": {n: int((weights_a[n] != 0).sum()) for n in shapes},
            "mask_kept": {n: int(masks_a[n].sum()) for n in shapes},
            "zero_outside_masks": all(bool((weights_a[n][~masks_a[n]] == 0).all()) for n in shapes),
            "numel": {n: weights_a[n].numel() for n in shapes},
            "reported_zeros": {n: layer.zeros for n, layer in report.layers.items()},
            "reported_global": report.global_sparsity,
            "budget": budget,
            "final_kept": method.final_kept(shapes),
            "resume_equal_weights": all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a),
            "resume_equal_masks": all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a),
            "resumed_step": callback_b.step,
            "mask_bytes_rank0": mask_bytes,
            "mask_bytes_full": sum(m.numel() for m in masks_a.values()),
            "checkpoint": sorted(p.name for p in (out / "ckpt").iterdir()),
            "half_is_folder": half.is_dir(),
            "mask_keys": sorted(k for k in FileSystemReader(half).read_metadata().state_dict_metadata
                                if "_sparsetrain" in k) if half.is_dir() else [],
        }
        (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), "--file" in sys.argv)
    if torch.distributed.is_initialized():  # Lightning leaves the gloo group up: torn down at exit, it can abort
        torch.distributed.destroy_process_group()  # ("terminate called without an active exception", rc -6)
