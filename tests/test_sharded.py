"""Sparse training with sharded parameters: FSDP2 (``fully_shard`` in ``configure_model``) through Lightning's
``ModelParallelStrategy``, 2 CPU processes (gloo), every hard-mask method; the sharded core functions on 2-3
processes against the same functions on whole tensors; what cannot be sharded fails at fit start."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from sparsetrain import SparsityCallback, consolidate_checkpoint
from sparsetrain.core.bits import unpack_rows
from tests.helpers import random_loader

pytest.importorskip("torch.distributed.fsdp")
HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args, timeout=600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_shard_core_every_method_masks_equal_whole_tensor_masks(tmp_path, world):
    """Static, GMP (uniform, global, overrides, 2:4), RigL (ERK, 2:4), SET, GraNet (global, layerwise), FixedMasks,
    and the top-k / global threshold / drop-and-grow primitives with heavy ties, k = 0 and k = N, on uneven and
    empty dim-0 pieces: the gathered sharded masks are bitwise the whole-tensor masks, counts included."""
    run(HERE / "shard_core.py", world, tmp_path / "out.json")
    results = json.loads((tmp_path / "out.json").read_text())
    bytes_sent = results.pop("bytes_sent")
    assert {case: r["equal"] for case, r in results.items()} == dict.fromkeys(results, True)
    for case, r in results.items():
        if "counts" in r:
            assert r["counts"] == r["whole_counts"], case
    assert 0 < bytes_sent < 400_000  # histograms and tie counts only (the weights are 140 KB)


def fsdp_fit(method: str, out: Path, *flags) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    run(HERE / "fsdp_run.py", method, out, *flags)
    return json.loads((out / "result.json").read_text())


METHODS = ["static", "gmp", "gmp_global", "rigl", "rigl_2to4", "set", "granet", "fixed"]


@pytest.mark.slow  # 2 processes, two fits: ~20-40 s each
@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_exact_counts_and_exact_resume_from_a_sharded_checkpoint(tmp_path, method):
    r = fsdp_fit(method, tmp_path)
    layers = list(r["numel"])
    # counted in the whole weights (full_tensor), and in the callback's gathered mask pieces
    assert r["zero_outside_masks"]
    if r["budget"] is not None and method != "granet":  # a count per layer (GraNet: its initial one): exactly the budget
        assert r["mask_kept"] == r["budget"]
    if method in ("gmp_global", "granet"):  # one global threshold: the total is exact
        assert sum(r["mask_kept"].values()) == r["final_kept"]
    if method == "fixed":  # the lottery masks, rows split over the ranks
        assert r["mask_kept"] == {"conv.weight": 30, "fc1.weight": 1188, "fc2.weight": 165}
    if method in ("static", "gmp", "gmp_global", "fixed"):  # nothing grows: the weights hold exactly the masks
        assert r["kept"] == r["mask_kept"]
    # what the callback reports (a sum over the ranks) is what the weights hold
    assert r["reported_zeros"] == r["zeros"]
    assert r["reported_global"] == pytest.approx(sum(r["zeros"].values()) / sum(r["numel"].values()), abs=0)
    # the masks rode along in the distributed checkpoint, and a resume from step 6 ends bitwise like the straight run
    assert r["half_is_folder"] and r["mask_keys"] == [f"state_dict._sparsetrain.SparsityCallback.{n}" for n in layers]
    assert r["resumed_step"] == 12 and r["resume_equal_masks"] and r["resume_equal_weights"]
    # each rank holds its rows of every mask: 17+3+5 of 33+5+10 rows
    assert r["mask_bytes_rank0"] < 0.55 * r["mask_bytes_full"]


@pytest.mark.slow
def test_fsdp2_single_file_checkpoint_holds_the_gathered_masks_and_resumes_exactly(tmp_path):
    r = fsdp_fit("rigl", tmp_path, "--file")
    assert not r["half_is_folder"] and r["mask_keys"] == []
    assert r["resume_equal_masks"] and r["resume_equal_weights"] and r["mask_kept"] == r["budget"]
    assert r["zero_outside_masks"] and r["reported_zeros"] == r["zeros"]  # counted in the gathered weights
    state = torch.load(tmp_path / "ckpt" / "step=6.ckpt", weights_only=False)["callbacks"]["SparsityCallback"]
    assert state["masks"] is None and state["sharded"]
    packed = state["packed_masks"]  # 1 bit per weight, whole tensors
    assert packed["fc1.weight"].dtype == torch.uint8 and tuple(packed["fc1.weight"].shape) == (33, 23)
    assert int(unpack_rows(packed["fc1.weight"], (33, 180)).sum()) == r["budget"]["fc1.weight"]


@pytest.mark.slow
def test_fsdp2_checkpoint_consolidates_into_one_file_that_a_single_device_trainer_resumes(tmp_path):
    sys.path.insert(0, str(HERE.parent))
    from tests.fsdp_run import ShardedNet, make_method

    r = fsdp_fit("rigl", tmp_path / "fsdp")
    folder = tmp_path / "fsdp" / "ckpt" / "step=6.ckpt"
    output = consolidate_checkpoint(folder, tmp_path / "one.ckpt")
    checkpoint = torch.load(output, weights_only=False)
    assert not any(k.startswith("_sparsetrain") for k in checkpoint["state_dict"])
    masks = checkpoint["callbacks"]["SparsityCallback"]["masks"]
    assert {n: int(m.sum()) for n, m in masks.items()} == r["budget"]
    assert all(bool((checkpoint["state_dict"][n][~m] == 0).all()) for n, m in masks.items())

    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["masks"] = {n: m.clone() for n, m in callback.masks.items()}

    callback = SparsityCallback(make_method("rigl"), seed=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=12, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, Probe()])
    trainer.fit(ShardedNet(), random_loader(n=96, batch_size=16), ckpt_path=output)
    assert all(torch.equal(seen["masks"][n], masks[n]) for n in masks)  # the sharded run's masks, whole
    assert callback.step == 12 and trainer.global_step == 12
    assert {n: int(m.sum()) for n, m in callback.masks.items()} == r["budget"]
    weights = {n: p.detach() for n, p in trainer.lightning_module.named_parameters() if n in masks}
    assert all(bool((weights[n][~callback.masks[n]] == 0).all()) for n in weights)  # the weights the model uses
    assert callback.sparsity_report().zeros == sum(int((w == 0).sum()) for w in weights.values())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["annealing", "srste"])
def test_fsdp2_forward_time_masks_fail_at_fit_start(method):
    script = HERE / "sharded_refused.py"
    done = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode != 0 and "TRAINED" not in done.stdout
    assert "SparsityConfigError" in done.stderr and "is not supported with sharded parameters" in done.stderr
    assert "Allowed under FSDP2: Static, GMP, RigL, SET, GraNet, FixedMasks" in done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy needs a GPU")
def test_fsdp1_strategy_fails_at_fit_start_on_gpu():
    from lightning.pytorch.strategies import FSDPStrategy

    from sparsetrain import SparsityConfigError
    from tests.helpers import TinyNet

    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=FSDPStrategy(), max_steps=2, logger=False,
                        enable_checkpointing=False, callbacks=[SparsityCallback("gmp", sparsity=0.5, end=2, every=1)])
    with pytest.raises(SparsityConfigError, match="strategy=FSDPStrategy is not supported"):
        trainer.fit(TinyNet(), random_loader())


@pytest.mark.slow  # two app runs on 2 processes: ~1 min
def test_fsdp2_app_run_is_exactly_sparse_and_resumes_from_its_folder_checkpoint(tmp_path):
    """``sparsetrain-train`` under ModelParallelStrategy on 2 CPU processes: the app's module shards itself
    (configure_model), the summary counts the sharded weights, and ckpt_path resumes from the DCP folder."""
    strategy = ["+trainer.strategy._target_=lightning.pytorch.strategies.ModelParallelStrategy",
                "+trainer.strategy.data_parallel_size=2", "+trainer.strategy.tensor_parallel_size=1"]
    common = ["-m", "sparsetrain.apps.train", "trainer.devices=2", "trainer.accelerator=cpu", *strategy,
              "trainer.enable_progress_bar=false", "hydra.job_logging.root.level=WARNING"]
    run(*common, "trainer.max_epochs=2", f"hydra.run.dir={tmp_path / 'a'}")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["prunable_weights"] == 65_440
    assert summary["nonzero_weights"] == 6_544 and summary["sparsity"] == pytest.approx(0.9, abs=0)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert last.is_dir()  # a distributed checkpoint: each rank wrote its shards, masks included

    run(*common, "trainer.max_epochs=3", f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'b'}")
    resumed = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert resumed["steps"] == 30 and resumed["nonzero_weights"] == 6_544


def test_layouts_other_than_fsdp2_dim0_shards_fail_with_a_message():
    """Tensor parallelism (Shard(1)), replicated DTensors and a mix of sharded and plain targets are refused,
    naming the target and its placements; FSDP2's (Shard(0),) is described by its rows."""
    done = run(HERE / "shard_layouts.py", timeout=120)
    lines = dict(line.split(": ", 1) for line in done.stdout.strip().splitlines())
    assert lines["replicate"].startswith("target fc.weight is a DTensor with placements=(Replicate(),)")
    assert lines["shard_dim1"].startswith("target fc.weight is a DTensor with placements=(Shard(dim=1),)")
    assert "placements=(Shard(dim=0),) on a 1-D mesh" in lines["shard_dim1"]
    assert lines["mixed"].startswith("targets ['head.weight'] are plain tensors while ['fc.weight'] are sharded")
    assert lines["shard0"] == "Piece(shape=(6, 8), start=0, stop=6) world=1" and lines["plain"] == "None"
