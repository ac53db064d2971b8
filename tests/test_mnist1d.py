"""MNIST-1D: the data module with the real generator and its checksum cache, the paper's two models, and a
short run of each preset through the real apps (sparsetrain-train, sparsetrain-lottery)."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from sparsetrain.apps import data as data_module
from sparsetrain.apps.data import MNIST1DDataModule
from sparsetrain.apps.lottery import run_lottery
from sparsetrain.apps.models import build_model
from sparsetrain.apps.train import config_dir, train

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One generated MNIST-1D cache for the whole module (the generator takes a second or two)."""
    root = tmp_path_factory.mktemp("data")
    MNIST1DDataModule(root=str(root)).prepare_data()
    return root


def compose_cfg(config: str, overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config, overrides=[*QUIET, *overrides])


# ------------------------------------------------------------------------- data


def test_generated_data_is_the_papers_with_a_held_out_validation_split(data_root):
    dm = MNIST1DDataModule(root=str(data_root), val_size=500, split_seed=0)
    assert (dm.num_classes, dm.in_chans, dm.img_size) == (10, 1, 40)  # known before setup: the model is built from them
    dm.setup()
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [3500, 500, 1000]
    x, y = dm.test_set.tensors
    assert x.shape == (1000, 1, 40) and x.dtype == torch.float32 and sorted(y.unique().tolist()) == list(range(10))
    # the paper's frozen dataset (mnist1d_data.pkl in greydanus/mnist1d): its first test signal and labels
    assert x[0, 0, :3].tolist() == pytest.approx([-0.07877078, -0.21073171, -0.09175138], abs=1e-6)
    assert y[:10].tolist() == [2, 6, 3, 9, 4, 3, 1, 9, 5, 2]
    train_x = torch.cat([dm.train_set.tensors[0], dm.val_set.tensors[0]])
    assert len(torch.unique(train_x, dim=0)) == 4000  # train and validation split the 4,000 training signals
    other = MNIST1DDataModule(root=str(data_root), val_size=500, split_seed=1)
    other.setup()
    assert not torch.equal(other.val_set.tensors[0], dm.val_set.tensors[0])
    everything = MNIST1DDataModule(root=str(data_root), val_size=0)
    everything.setup()
    assert len(everything.train_set) == 4000 and everything.val_set is everything.test_set
    batch = next(iter(everything.train_dataloader()))
    assert batch[0].shape == (100, 1, 40)  # the paper's batch size is the default


def test_cache_is_read_back_and_regenerated_when_its_checksum_fails(data_root, tmp_path, monkeypatch, caplog):
    root = tmp_path / "root"
    (root / "mnist1d").mkdir(parents=True)
    for f in (data_root / "mnist1d").iterdir():
        (root / "mnist1d" / f.name).write_bytes(f.read_bytes())
    dm = MNIST1DDataModule(root=str(root))
    arrays_file, meta_file = dm.cache_files()
    assert json.loads(meta_file.read_text())["dataset_args"]["seed"] == 42  # the package's default arguments

    generate = data_module._generate_mnist1d
    monkeypatch.setattr(data_module, "_generate_mnist1d", lambda args: pytest.fail("the cache was not used"))
    dm.setup()  # read back, checksum checked

    arrays_file.write_bytes(arrays_file.read_bytes()[:-8] + b"corrupt!")
    calls = []
    monkeypatch.setattr(data_module, "_generate_mnist1d", lambda args: calls.append(args) or generate(args))
    random.seed(7)
    np.random.seed(7)
    expected = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    with caplog.at_level(logging.WARNING, logger="sparsetrain.apps.data"):
        again = MNIST1DDataModule(root=str(root))
        again.setup()
    assert len(calls) == 1 and "does not match the checksum" in caplog.text
    assert (random.random(), np.random.rand()) == expected  # the generator reseeds both; the module restores them
    assert torch.equal(again.test_set.tensors[0], dm.test_set.tensors[0])
    assert json.loads(meta_file.read_text())["sha256"] == data_module._sha256(arrays_file)


def test_dataset_args_name_their_own_cache_and_unknown_ones_fail(data_root):
    default, shuffled = MNIST1DDataModule(root=str(data_root)), MNIST1DDataModule(root=str(data_root), dataset_args={"shuffle_seq": True})
    assert default.cache_files()[0] != shuffled.cache_files()[0]
    assert MNIST1DDataModule(dataset_args={"final_seq_length": 60}).img_size == 60
    with pytest.raises(ValueError, match="unknown keys \\['noise'\\].*corr_noise_scale"):
        MNIST1DDataModule(root=str(data_root), dataset_args={"noise": 1.0}).cache_files()


# ----------------------------------------------------------------------- models


def count(model, suffix=""):
    return sum(p.numel() for name, p in model.named_parameters() if name.endswith(suffix))


def test_models_are_the_papers():
    mlp = build_model("mnist1d_mlp", num_classes=10, in_chans=1, img_size=40)
    assert (count(mlp), count(mlp, "weight")) == (276_010, 275_000)  # 40-500-500-10
    assert count(build_model("mnist1d_mlp", num_classes=10, in_chans=1, img_size=40, hidden=100)) == 15_210  # MLPBase
    cnn = build_model("mnist1d_cnn", num_classes=10, in_chans=1, img_size=40)
    assert (count(cnn), count(cnn, "weight")) == (5_210, 5_125)  # the paper's ConvBase prints 5210 parameters
    assert cnn.fc.in_features == 125  # 25 channels x length 5 (40 -> 19 -> 10 -> 5)
    x = torch.randn(4, 1, 40)
    assert mlp(x).shape == cnn(x).shape == (4, 10)
    # the residual hidden layer: h + relu(fc2 h)
    with torch.no_grad():
        mlp.fc2.weight.zero_()
        mlp.fc2.bias.fill_(-1.0)
        h = torch.relu(mlp.fc1(x.flatten(1)))
        assert torch.allclose(mlp(x), mlp.fc3(h))


# ------------------------------------------------------------------ the presets


@pytest.mark.parametrize(
    "overrides, model, steps",
    [
        (["data=mnist1d", "model=mnist1d_cnn", "trainer.max_epochs=1", "+trainer.limit_train_batches=3"], "mnist1d_cnn", 3),
        (["experiment=mnist1d_mlp", "sparsity=rigl", "sparsity.method.sparsity=0.95", "trainer.max_steps=4"], "mnist1d_mlp", 4),
        (["experiment=mnist1d_cnn", "sparsity=static", "sparsity.method.sparsity=0.8", "trainer.max_steps=4"], "mnist1d_cnn", 4),
    ],
)
def test_training_app_runs_the_presets(overrides, model, steps, data_root, tmp_path, caplog):
    cfg = compose_cfg("train", [*overrides, f"data.root={data_root}", f"paths.output_dir={tmp_path}", "~logger",
                                "callbacks=none", "+trainer.limit_val_batches=1"])
    with caplog.at_level(logging.INFO, logger="sparsetrain.apps.train"):
        summary = train(cfg)
    assert (summary["model"], summary["data"], summary["steps"]) == (model, "mnist1d", steps)
    assert summary["sparsity"] == pytest.approx(summary["target_sparsity"], abs=1e-3) and summary["sparsity"] >= 0.8
    assert "sparsetrain summary: model=" + model in caplog.text and 0 <= summary["test_acc"] <= 1


def test_lottery_preset_runs_with_its_controls(data_root, tmp_path, caplog):
    base = ["experiment=lth_mlp_mnist1d", f"data.root={data_root}", f"lottery.dir={tmp_path}", "lottery.levels=2",
            "trainer.max_steps=3"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="sparsetrain.apps.lottery"):
        main = run_lottery(compose_cfg("lottery", base))
    assert [r["level"] for r in main] == [0, 1, 2] and all(r["steps"] == 3 for r in main)
    assert main[-1]["test_acc"] == main[-1]["test_acc_final"]  # monitor null: the final weights, as the notebook
    assert "summary.md" in caplog.text
    masks = torch.load(tmp_path / "level_02" / "masks.pt")
    assert {n: round(m.float().mean().item(), 3) for n, m in masks.items()} == {  # layer-wise: 0.8^2 of every layer
        "net.fc1.weight": 0.64, "net.fc2.weight": 0.64, "net.fc3.weight": 0.64}
    for control in ("reinit", "random_mask"):
        rows = run_lottery(compose_cfg("lottery", [*base, f"lottery.control={control}"]))
        assert [r["run"] for r in rows] == [control, control]
        assert rows[-1]["density"] == pytest.approx(main[-1]["density"], abs=1e-5)
    random_masks = torch.load(tmp_path / "control_random_mask" / "level_02" / "masks.pt")
    assert all(random_masks[n].sum() == m.sum() and not torch.equal(random_masks[n], m) for n, m in masks.items())
    assert (tmp_path / "accuracy_vs_density.png").is_file()
