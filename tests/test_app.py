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


SPARSITY_CONFIGS = ["dense", "static", "gmp", "rigl", "set", "granet", "annealing", "srste"]


@pytest.mark.parametrize("name", SPARSITY_CONFIGS)
def test_sparsity_configs_instantiate(name):
    sparsity = "0.5" if name == "srste" else "0.95"  # SR-STE's sparsity must be its structure's 1 - N/M
    cfg = compose_cfg(overrides=[f"sparsity={name}", f"sparsity.method.sparsity={sparsity}"])
    callback = instantiate(cfg.sparsity)
    assert isinstance(callback, SparsityCallback)
    expected = {"dense": Dense, "static": Static, "gmp": GMP}.get(name)
    if expected is not None:
        assert isinstance(callback.method, expected)
    if name != "dense":
        assert callback.method.sparsity == float(sparsity)


@pytest.mark.parametrize("name", ["static", "gmp", "rigl", "set", "annealing", "srste"])
def test_sparsity_configs_take_a_structure(name):
    overrides = [f"sparsity={name}", "sparsity.method.structure=1:4"]
    if name != "srste":
        overrides += ["sparsity.method.sparsity=0.75", "sparsity.method.distribution=uniform"]
    callback = instantiate(compose_cfg(overrides=overrides).sparsity)
    assert callback.method.budget.structure == "1:4" and callback.method.sparsity == 0.75


def test_a_structure_that_cannot_be_met_fails_with_the_key():
    cfg = compose_cfg(overrides=["sparsity=rigl", "sparsity.method.structure=2:4", "sparsity.method.distribution=uniform"])
    with pytest.raises(Exception, match=r"sparsity=0.9 does not match structure='2:4'.*set sparsity=0.5"):
        instantiate(cfg.sparsity)
    cfg = compose_cfg(overrides=["sparsity=granet", "sparsity.method.structure=2:4"])
    with pytest.raises(Exception, match="GraNet has no N:M option"):
        instantiate(cfg.sparsity)


@pytest.mark.parametrize(
    "experiment",
    ["digits_quick", "gmp_resnet20_cifar10", "static_vgg16_cifar10", "gmp_lenet300_mnist", "srste_vit_tiny_cifar10",
     "gmp_2to4_resnet50_imagenet"],
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


# ------------------------------------------- config groups: sparsity base, callbacks, paths

CALLBACK_NODE = {
    "_target_": "sparsetrain.SparsityCallback",
    "_convert_": "all",
    "include": None,
    "exclude": None,
    "dense_first": False,
    "dense_last": False,
    "seed": 0,
    "log_per_layer": True,
    "compute": "masked",
}
# a few method keys of each sparsity option, as each file held them before the shared _callback.yaml
METHOD_KEYS = {
    "dense": {"_target_": "sparsetrain.apps.train.dense_method", "sparsity": None},
    "static": {"_target_": "sparsetrain.methods.Static", "sparsity": 0.9, "distribution": "erk", "overrides": None},
    "gmp": {"_target_": "sparsetrain.methods.GMP", "sparsity": 0.9, "start": 0.1, "end": 0.7, "schedule": "cubic"},
    "rigl": {"_target_": "sparsetrain.methods.RigL", "every": 0.02, "drop_fraction": 0.3, "end": 0.75, "init": "random"},
    "set": {"_target_": "sparsetrain.methods.SET", "every": 0.02, "drop_fraction": 0.3, "skip_optimizer_step": False},
    "granet": {"_target_": "sparsetrain.methods.GraNet", "initial_density": 1.0, "regrowth_fraction": 0.5},
    "annealing": {"_target_": "sparsetrain.methods.StochasticAnnealing", "target": "magnitude", "end": 0.5},
}


@pytest.mark.parametrize("name", list(METHOD_KEYS))
def test_sparsity_options_compose_to_the_full_callback_node(name):
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(compose_cfg(overrides=[f"sparsity={name}"]).sparsity, resolve=True)
    method = node.pop("method")
    assert node == CALLBACK_NODE  # exactly the callback keys, from configs/sparsity/_callback.yaml
    assert {k: method[k] for k in METHOD_KEYS[name]} == METHOD_KEYS[name]
    assert compose_cfg(overrides=[f"sparsity={name}", "seed=7"]).sparsity.seed == 7  # seed: ${seed}


def test_set_is_rigl_with_another_class():
    from omegaconf import OmegaConf

    rigl, set_ = (OmegaConf.to_container(compose_cfg(overrides=[f"sparsity={n}"]).sparsity) for n in ("rigl", "set"))
    assert set_["method"].pop("_target_") == "sparsetrain.methods.SET"
    assert rigl["method"].pop("_target_") == "sparsetrain.methods.RigL"
    import inspect

    from sparsetrain.methods import RigL

    assert set_ == rigl and sorted(rigl["method"]) == sorted(inspect.signature(RigL).parameters)  # every RigL argument


def test_callbacks_and_paths_groups():
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sparsetrain.apps.hydra_utils import instantiate_callbacks

    cfg = compose_cfg(Path("/run"))
    assert cfg.paths.output_dir == "/run"
    checkpoint = cfg.callbacks.model_checkpoint
    assert checkpoint.dirpath == "/run/checkpoints" and checkpoint.filename == "epoch{epoch:03d}-step{step:06d}"
    assert (checkpoint.save_last, checkpoint.save_top_k, checkpoint.save_on_exception) == (True, 1, True)
    assert checkpoint.monitor is None and checkpoint.mode == "max" and checkpoint.auto_insert_metric_name is False
    assert [type(c) for c in instantiate_callbacks(cfg.callbacks)] == [ModelCheckpoint]
    more = compose_cfg(Path("/run"), [f"+callbacks.stop._target_={__name__}.StopAfterEpochs", "+callbacks.stop.epochs=2"])
    assert [type(c).__name__ for c in instantiate_callbacks(more.callbacks)] == ["ModelCheckpoint", "StopAfterEpochs"]
    assert instantiate_callbacks(compose_cfg(Path("/run"), ["callbacks=none"]).callbacks) == []
    assert instantiate_callbacks(compose_cfg(Path("/run"), ["callbacks.model_checkpoint=null"]).callbacks) == []
    with pytest.raises(ValueError, match=r"callbacks\.es has no _target_"):
        instantiate_callbacks(compose_cfg(Path("/run"), ["+callbacks.es.monitor=val/acc"]).callbacks)


CALLBACK_ORDER: list[str] = []


class RecordCallbackOrder(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        CALLBACK_ORDER[:] = [type(c).__name__ for c in trainer.callbacks]


def test_sparsity_callback_runs_first(tmp_path):
    summary = run(tmp_path, [*ONE_STEP, f"+callbacks.order._target_={__name__}.RecordCallbackOrder"])
    order = CALLBACK_ORDER
    assert order[0] == "SparsityCallback" and order.index("RecordCallbackOrder") < order.index("ModelCheckpoint")
    assert summary["last_checkpoint"] == str(tmp_path / "checkpoints" / "last.ckpt")
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


# -------------------------------------------------------------------- optimized_metric


def test_optimized_metric_is_returned_and_checked(tmp_path):
    from sparsetrain.apps.train import main, optimized_value

    cfg = compose_cfg(tmp_path, [*ONE_STEP, "~logger", "optimized_metric=val/loss"])
    assert cfg.optimized_metric == "val/loss" and compose_cfg().optimized_metric == "test/acc"
    value = main.__wrapped__(cfg)  # the task function under @hydra.main
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert value == summary["metrics"]["val/loss"] and isinstance(value, float)
    assert optimized_value(summary, "test/acc") == summary["test_acc"]
    assert optimized_value(summary, "val/acc") == summary["val_acc"]
    assert optimized_value(summary, None) is None
    with pytest.raises(KeyError, match=r"optimized_metric='val/acx'.*val/acc"):
        optimized_value(summary, "val/acx")
    assert optimized_value({**summary, "test_acc": None, "metrics": {"val/acc": 0.5}}, "test/acc") is None  # test=false


# ------------------------------------------------------- the experiment in every logger


def test_summary_records_the_method_arguments(tmp_path):
    summary = run(tmp_path, [*ONE_STEP, "~logger", "sparsity=static", "sparsity.method.sparsity=0.8"])
    assert summary["method_name"] == "Static" and summary["method_args"]["sparsity"] == 0.8
    assert summary["method_args"]["distribution"] == "erk"
    assert summary["method_repr"] == summary["method"] and summary["method"].startswith("Static(")
    assert summary["overrides"] is None  # not under Hydra's main: no command line


def test_csv_and_tensorboard_get_the_config_as_hparams(tmp_path):
    import yaml

    run(tmp_path, [*ONE_STEP, "logger=[csv,tensorboard]", "seed=3", "sparsity=rigl", "sparsity.method.sparsity=0.7"])
    for path in (tmp_path / "csv" / "hparams.yaml", tmp_path / "tensorboard" / "hparams.yaml"):
        hp = yaml.safe_load(path.read_text())
        assert hp["method"]["name"] == "RigL" and hp["method"]["args"]["sparsity"] == 0.7, path
        assert hp["sparsity"]["method"]["_target_"] == "sparsetrain.methods.RigL"
        assert hp["model"]["name"] == "digits_cnn" and hp["seed"] == 3 and hp["sparsity"]["seed"] == 3
        assert hp["data"]["_target_"].endswith("DigitsDataModule") and hp["trainer"]["max_epochs"] == 1
        assert hp["lr"] == 0.1  # the module's own hyperparameters (Lightning) stay next to the config


def test_wandb_offline_logs_the_config_and_the_sweep_group(tmp_path, monkeypatch):
    import wandb

    from sparsetrain.apps import hydra_utils

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(hydra_utils, "sweep_group", lambda hc=None: "multirun/study")  # as in a multirun
    recorded = {}
    finish = wandb.finish

    def read_config_then_finish(*args, **kwargs):
        recorded.update(config=dict(wandb.run.config), group=wandb.run.group)
        return finish(*args, **kwargs)

    monkeypatch.setattr(wandb, "finish", read_config_then_finish)
    run(tmp_path, ["logger=wandb", *ONE_STEP, "seed=5", "sparsity.method.sparsity=0.8"])
    config = recorded["config"]
    assert config["method"]["name"] == "GMP" and config["method"]["args"]["sparsity"] == 0.8
    assert config["sparsity"]["method"]["sparsity"] == 0.8
    assert config["model"]["name"] == "digits_cnn" and config["seed"] == 5
    assert recorded["group"] == "multirun/study"


def test_wandb_group_only_where_none_is_set(tmp_path):
    from types import SimpleNamespace

    from hydra.types import RunMode

    from sparsetrain.apps.hydra_utils import set_wandb_group, sweep_group

    hc = lambda mode, sweep: SimpleNamespace(mode=mode, sweep=SimpleNamespace(dir=sweep), runtime=SimpleNamespace(cwd=str(tmp_path)))  # noqa: E731
    assert sweep_group(hc(RunMode.MULTIRUN, str(tmp_path / "multirun" / "2025-01-31" / "12-00-00"))) == "multirun/2025-01-31/12-00-00"
    assert sweep_group(hc(RunMode.MULTIRUN, "/elsewhere/sweep")) == "/elsewhere/sweep"
    assert sweep_group(hc(RunMode.RUN, "multirun/x")) is None
    assert sweep_group() is None  # outside Hydra
    cfg = compose_cfg(tmp_path, ["logger=many"])
    assert cfg.logger.wandb.group is None
    assert set_wandb_group(cfg.logger, "multirun/x") == "multirun/x" and cfg.logger.wandb.group == "multirun/x"
    assert "group" not in cfg.logger.csv
    mine = compose_cfg(tmp_path, ["logger=wandb", "logger.wandb.group=mine"])
    assert set_wandb_group(mine.logger, "multirun/x") is None and mine.logger.wandb.group == "mine"
    assert set_wandb_group(compose_cfg(tmp_path).logger) is None  # no multirun


def test_multirun_records_overrides_and_wandb_group(tmp_path):
    import yaml

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "sparsetrain.apps.train", "-m", "seed=4", "logger=[csv,wandb]", *ONE_STEP, *QUIET,
           f"hydra.sweep.dir={sweep}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert "seed=4" in summary["overrides"] and "logger=[csv,wandb]" in summary["overrides"]
    hp = yaml.safe_load((sweep / "0" / "csv" / "hparams.yaml").read_text())
    assert hp["logger"]["wandb"]["group"] == str(sweep) and "seed=4" in hp["overrides"]
    assert len(list(sweep.glob("0/wandb/offline-run-*/run-*.wandb"))) == 1
