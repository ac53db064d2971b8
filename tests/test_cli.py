"""The LightningCLI example (examples/cli): config-driven SparsityCallback, exact counts, resume from last.ckpt."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("jsonargparse")

from sparsetrain import SparsityCallback  # noqa: E402
from sparsetrain.core import layer_counts  # noqa: E402
from sparsetrain.methods import GMP, RigL  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cli"
CONFIG = str(EXAMPLE / "config.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=2"]
TARGETS = ["conv.weight", "fc1.weight", "fc2.weight"]
STEPS_PER_EPOCH = 20  # 1257 training digits, batch 64


@pytest.fixture(scope="module")
def train():
    """examples/cli/train.py as a module."""
    spec = importlib.util.spec_from_file_location("sparsetrain_example_cli_train", EXAMPLE / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when ``args=`` comes with command-line arguments (pytest's own)."""
    monkeypatch.setattr(sys, "argv", ["train.py"])


def _callback(cli) -> SparsityCallback:
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, SparsityCallback)]
    return cb


def _expected_zeros(model, sparsity: float) -> dict[str, int]:
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in TARGETS}
    kept = layer_counts(shapes, sparsity, "uniform")
    return {n: params[n].numel() - kept[n] for n in TARGETS}


def _zeros(model) -> dict[str, int]:
    params = dict(model.named_parameters())
    return {n: int((params[n] == 0).sum()) for n in TARGETS}


def test_cli_trains_to_exact_gmp_counts_and_resumes_from_last_ckpt(train, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative paths (lightning_logs/cli/...) land here
    cli = train.main(["fit", "--config", CONFIG, "--trainer.max_epochs=2", *QUIET])
    cb = _callback(cli)
    assert isinstance(cb.method, GMP) and cb.method.hparams()["every"] == 10
    assert list(cb.targets) == TARGETS
    assert cli.trainer.global_step == 2 * STEPS_PER_EPOCH
    assert _zeros(cli.model) == _expected_zeros(cli.model, 0.9)

    last = tmp_path / "lightning_logs" / "cli" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    saved = ckpt["callbacks"][cb.state_key]
    assert saved["step"] == 2 * STEPS_PER_EPOCH and list(saved["masks"]) == TARGETS
    for n in TARGETS:  # the checkpoint's weights are zero exactly outside its masks
        assert torch.equal(ckpt["state_dict"][n] != 0, saved["masks"][n])

    resumed = train.main(["fit", "--config", CONFIG, "--trainer.max_epochs=3", "--ckpt_path", str(last), *QUIET])
    cb2 = _callback(resumed)
    assert cb2 is not cb and resumed.trainer.global_step == 3 * STEPS_PER_EPOCH and cb2.step == 3 * STEPS_PER_EPOCH
    for n in TARGETS:  # past the schedule's end: the masks are the checkpoint's, the zeros stay where they were
        assert torch.equal(cb2.masks[n].cpu(), saved["masks"][n])
        assert torch.equal(dict(resumed.model.named_parameters())[n].detach() != 0, saved["masks"][n])
    assert _zeros(resumed.model) == _expected_zeros(resumed.model, 0.9)
    assert any(not torch.equal(resumed.model.state_dict()[n], ckpt["state_dict"][n]) for n in TARGETS)  # it trained


def test_cli_switches_the_method_from_the_command_line(train, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", CONFIG, "--trainer.callbacks.method=sparsetrain.methods.RigL",  # run=False: no subcommand
            "--trainer.callbacks.method.sparsity=0.8", "--trainer.callbacks.method.every=5"]  # fmt: skip
    cli = train.main(args, run=False)
    method = _callback(cli).method
    assert isinstance(method, RigL)
    hp = method.hparams()
    assert (hp["sparsity"], hp["every"], hp["end"], hp["distribution"]) == (0.8, 5, 0.5, "erk")  # end kept from the GMP entry
