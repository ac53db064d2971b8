"""The Hydra training app: configs compose, every model family trains a step with the callback,
multirun, wandb offline, resume, and clear errors for bad input. All on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate

from sparsetrain import SparsityCallback
from sparsetrain.apps.models import build_model
from sparsetrain.apps.train import config_dir, train
from sparsetrain.methods import GMP, Dense, Static

REPO = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# one optimizer step, one val batch, one test batch
ONE_STEP = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=1",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
]


def compose_cfg(tmp_path: Path | None = None, overrides: list[str] = ()):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        extra = [f"paths.output_dir={tmp_path}"] if tmp_path is not None else []
        return compose("train", overrides=[*extra, *QUIET, *overrides])


def run(tmp_path: Path, overrides: list[str]) -> dict:
    return train(compose_cfg(tmp_path, overrides))


class StopAfterEpochs(pl.Callback):
    """Stands in for a preempted job: stop (after the epoch's checkpoint) once ``epochs`` are done."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


# ---------------------------------------------------------------- configs compose


def test_default_config_composes():
    cfg = compose_cfg()
    assert cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.model.name == "digits_cnn"
    assert cfg.sparsity.method._target_ == "sparsetrain.methods.GMP"
    assert cfg.sparsity.method.sparsity == 0.9
    assert cfg.trainer.accelerator == "cpu"
    assert "csv" in cfg.logger


def test_default_job_one_epoch(tmp_path):
    summary = run(tmp_path, ["trainer.max_epochs=1"])
    assert summary["steps"] == 20  # 1257 training digits, batch 64
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert summary["test_acc"] is not None and summary["val_acc"] is not None
    assert json.loads((tmp_path / "summary.json").read_text())["sparsity"] == summary["sparsity"]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/acc", "test/acc", "sparsity/global", "sparsity/target"} <= set(header)
    layer_keys = [k for k in header if k.startswith("sparsity/layer/")]
    assert len(layer_keys) == len(summary["layers"]) == 5


SPARSITY_CONFIGS = ["dense", "static", "gmp", "rigl", "set", "granet"]


@pytest.mark.parametrize("name", SPARSITY_CONFIGS)
def test_sparsity_configs_instantiate(name):
    cfg = compose_cfg(overrides=[f"sparsity={name}", "sparsity.method.sparsity=0.95"])
    callback = instantiate(cfg.sparsity)
    assert isinstance(callback, SparsityCallback)
    expected = {"dense": Dense, "static": Static, "gmp": GMP}.get(name)
    if expected is not None:
        assert isinstance(callback.method, expected)
    if name != "dense":
        assert callback.method.sparsity == 0.95


@pytest.mark.parametrize(
    "experiment", ["digits_quick", "gmp_resnet20_cifar10", "static_vgg16_cifar10", "gmp_lenet300_mnist"]
)
def test_experiments_compose(experiment):
    cfg = compose_cfg(overrides=[f"experiment={experiment}"])
    instantiate(cfg.sparsity)
    instantiate(cfg.module, net=torch.nn.Linear(2, 2), num_classes=2)


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb", "many"])
def test_logger_configs_instantiate(logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg(tmp_path, [f"logger={logger}"])
    loggers = [instantiate(c) for c in cfg.logger.values()]
    assert all(isinstance(lg, pl.loggers.Logger) for lg in loggers) and loggers


# ------------------------------------------------- every model family trains a step

SMALL_GRAY = ["data=synthetic", "data.in_chans=1", "data.img_size=8", "data.num_samples=16", "data.batch_size=8"]
SMALL_RGB = ["data=synthetic", "data.num_samples=16", "data.batch_size=8"]

MODELS = {
    "digits_cnn": ["model=digits_cnn", *SMALL_GRAY],
    "lenet300_100": ["model=lenet300_100", *SMALL_GRAY],
    "lenet5": ["model=lenet5", *SMALL_GRAY],
    "resnet20": ["model=resnet20", *SMALL_RGB],
    "vgg16": ["model=vgg16", "model.width=0.25", *SMALL_RGB],
    "timm_cnn": ["model=timm", "model.name=resnet10t", *SMALL_RGB],
    "timm_vit": [
        "model=timm",
        "model.name=vit_tiny_patch16_224",
        "model.img_size=32",
        "+model.patch_size=8",
        *SMALL_RGB,
    ],
    "torchvision_resnet18": ["model=torchvision", "model.name=resnet18", *SMALL_RGB],
    "torchvision_resnet18_gray_8px": ["model=torchvision", "model.name=resnet18", *SMALL_GRAY],
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_family_trains_one_step_sparse(name, tmp_path):
    summary = run(tmp_path, [*MODELS[name], *ONE_STEP, "~logger"])
    assert summary["steps"] == 1
    # GMP with end=0.7 of 1 step: the final pruning lands on step 1
    assert summary["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert 0.0 <= summary["test_acc"] <= 1.0


def test_torchvision_first_conv_adapts_to_one_channel():
    model = build_model("mobilenet_v3_small", "torchvision", num_classes=3, in_chans=1, img_size=64)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)


def test_lr_schedules():
    from sparsetrain.apps.module import lr_factor

    cosine = lr_factor("cosine", total=100, steps_per_epoch=10, warmup=10, step_size=1, milestones=[], gamma=0.1)
    assert [cosine(t) for t in (0, 4, 9, 10, 55, 100)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 0.5, 0.0])
    multistep = lr_factor("multistep", 100, 10, 0, 1, milestones=[3, 6], gamma=0.1)
    assert [multistep(t) for t in (29, 30, 59, 60)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    step = lr_factor("step", 100, 10, 0, step_size=2, milestones=[], gamma=0.5)
    assert [step(t) for t in (19, 20, 40)] == pytest.approx([1.0, 0.5, 0.25])


def test_adamw_with_warmup_trains(tmp_path):
    summary = run(
        tmp_path,
        [
            *MODELS["digits_cnn"],
            *ONE_STEP,
            "~logger",
            "module.optimizer=adamw",
            "module.lr=1e-3",
            "module.warmup=0.5",
            "module.lr_schedule=multistep",
            "module.milestones=[1]",
        ],
    )
    assert summary["steps"] == 1


# ------------------------------------------------------------------------ multirun


def test_multirun_two_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "sparsetrain.train",
        "-m",
        "sparsity=dense,static",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        *QUIET,
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [s["method"].split("(")[0] for s in summaries] == ["Dense", "Static"]
    assert summaries[1]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert all((sweep / str(i) / ".hydra" / "config.yaml").is_file() for i in (0, 1))
    assert "sparsetrain summary" in done.stdout + done.stderr


# --------------------------------------------------------------------------- wandb


def test_wandb_offline_records_sparsity(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    recorded = {}
    finish = wandb.finish

    def read_summary_then_finish(*args, **kwargs):  # the run's summary, as wandb-core holds it
        recorded.update({k: wandb.run.summary[k] for k in wandb.run.summary.keys()})
        return finish(*args, **kwargs)

    monkeypatch.setattr(wandb, "finish", read_summary_then_finish)
    run(tmp_path, ["logger=wandb", *ONE_STEP])
    assert len(list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    assert recorded["sparsity/global"] == pytest.approx(0.9, abs=1e-3)
    assert "sparsity/target" in recorded and "test/acc" in recorded


# -------------------------------------------------------------------------- resume

# 2 x 20 steps per epoch of digits at a small width; GMP from step 4 to 56 every 4 steps
RESUME = [
    "trainer.max_epochs=4",
    "~logger",
    "sparsity.method.start=4",
    "sparsity.method.end=56",
    "sparsity.method.every=4",
]


def _weights(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)


def test_resume_continues_schedule_exactly(tmp_path):
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    run(straight, RESUME)
    stop = [f"+callbacks.stop._target_={__name__}.StopAfterEpochs", "+callbacks.stop.epochs=2"]
    half = run(first, [*RESUME, *stop])
    assert half["steps"] == 40 and 0.0 < half["sparsity"] < 0.9  # stopped in the middle of the schedule
    last = first / "checkpoints" / "last.ckpt"
    end = run(resumed, [*RESUME, f"ckpt_path={last}"])

    assert end["steps"] == 80 and end["sparsity"] == pytest.approx(0.9, abs=1e-3)
    state_first = next(v for k, v in _weights(last)["callbacks"].items() if k.startswith("SparsityCallback"))
    state_end = next(
        v
        for k, v in _weights(resumed / "checkpoints" / "last.ckpt")["callbacks"].items()
        if k.startswith("SparsityCallback")
    )
    assert state_first["step"] == 40 and state_end["step"] == 80
    # pruned weights stay pruned across the resume
    for name, mask in state_first["masks"].items():
        assert not (state_end["masks"][name] & ~mask).any()
    # same data order, masks and schedule as the uninterrupted run: identical weights
    a = _weights(straight / "checkpoints" / "last.ckpt")["state_dict"]
    b = _weights(resumed / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------- bad input


@pytest.mark.parametrize("group, listed", [("model", "digits_cnn"), ("data", "cifar10"), ("sparsity", "gmp")])
def test_unknown_group_option_lists_choices(group, listed):
    with pytest.raises(MissingConfigException, match=listed):
        compose_cfg(overrides=[f"{group}=nope"])


@pytest.mark.parametrize(
    "family, hint", [("sparsetrain", "digits_cnn"), ("timm", "timm.list_models"), ("torchvision", "list_models")]
)
def test_unknown_model_name_lists_choices(family, hint):
    cfg = compose_cfg(overrides=[f"model={'digits_cnn' if family == 'sparsetrain' else family}", "model.name=nope"])
    with pytest.raises(Exception, match=hint):
        instantiate(cfg.model, num_classes=10, in_chans=3, img_size=32)


def test_unknown_torchvision_dataset_lists_choices():
    cfg = compose_cfg(overrides=["data=cifar10", "data.name=svhn"])
    with pytest.raises(Exception, match="cifar100"):
        instantiate(cfg.data)


def test_missing_imagefolder_names_the_path(tmp_path):
    missing = tmp_path / "no_such_images"
    cfg = compose_cfg(overrides=["data=imagefolder", f"data.root={missing}"])
    with pytest.raises(Exception, match="no_such_images"):
        instantiate(cfg.data)


def test_imagefolder_reads_class_folders(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(tmp_path / label / f"{i}.png")
    cfg = compose_cfg(overrides=["data=imagefolder", f"data.root={tmp_path}", "data.img_size=8", "data.num_workers=0"])
    data = instantiate(cfg.data)
    data.setup("fit")
    assert data.num_classes == 2 and len(data.train_set) + len(data.val_set) + len(data.test_set) == 10
    images, _ = next(iter(data.train_dataloader()))
    assert images.shape[1:] == (3, 8, 8)


def test_cifar10_without_files_explains_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.download=true.*data\.root"):
        run(tmp_path, ["data=cifar10", f"data.root={tmp_path / 'data'}", "data.num_workers=0", "~logger"])


def test_bad_method_value_names_the_key():
    cfg = compose_cfg(overrides=["sparsity.method.distribution=bogus"])
    with pytest.raises(Exception, match="distribution='bogus'"):
        instantiate(cfg.sparsity)
