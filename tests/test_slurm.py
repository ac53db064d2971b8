"""SLURM and multi-node configuration, on CPU: the launcher and trainer configs compose into the sbatch
script and Trainer we mean, ``ckpt_path=auto`` resumes a run in its own folder, a requeue signal under
(simulated) SLURM leaves a checkpoint that the rerun resumes from, and ``ddp_spawn`` writes its summary.

No cluster here: the SLURM runs are two local processes with the environment ``srun`` gives its tasks,
``scontrol`` a stand-in that records its arguments.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from sparsetrain.apps.train import config_dir
from tests.test_app import QUIET, REPO, _weights, run


def _has_submitit_plugin() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


# hydra/launcher=slurm and the trainer options that select it need hydra-submitit-launcher (the [slurm] extra)
needs_submitit = pytest.mark.skipif(not _has_submitit_plugin(), reason="needs pip install -e .[slurm]")


@pytest.fixture
def hydra_cfg():
    """Compose with the ``hydra`` node and make it the current HydraConfig (as inside a job), then forget it."""

    def make(overrides):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield make
    HydraConfig.instance().cfg = None


# ----------------------------------------------------------------------------- configs


@needs_submitit
@pytest.mark.parametrize("name", ["slurm_ddp", "fsdp"])
def test_trainer_takes_devices_and_nodes_from_the_launcher(hydra_cfg, name):
    cfg = hydra_cfg([f"trainer={name}", "hydra.launcher.tasks_per_node=4", "hydra.launcher.nodes=2"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")  # the trainer option selects the launcher
    assert cfg.hydra.launcher.gpus_per_node == 4  # one GPU per task
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.accelerator) == (4, 2, "gpu")
    assert cfg.ckpt_path == "auto"
    if name == "slurm_ddp":
        assert cfg.trainer.strategy == "ddp" and cfg.trainer.sync_batchnorm
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = instantiate(cfg.trainer.strategy)
        assert isinstance(strategy, ModelParallelStrategy) and cfg.trainer.precision == "bf16-mixed"
        assert strategy._tensor_parallel_size == 1 and strategy._save_distributed_checkpoint


@needs_submitit
def test_command_line_launcher_and_ckpt_path_win(hydra_cfg):
    cfg = hydra_cfg(["trainer=slurm_ddp", "hydra/launcher=local", "ckpt_path=null"])
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher")
    assert cfg.ckpt_path is None
    assert cfg.trainer.devices == 1


@needs_submitit
def test_sbatch_script_requeues_on_usr1_with_memory_per_gpu(hydra_cfg, tmp_path, monkeypatch):
    """The real launcher's ``launch`` builds submitit's executor; its sbatch text is what SLURM would get."""
    import submitit

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit's SlurmExecutor looks for srun
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    executors = []
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", lambda self, *args: executors.append(self) or [])

    sweep = tmp_path / "sweep"
    cfg = hydra_cfg(["trainer=slurm_ddp", "hydra.launcher.tasks_per_node=4", "hydra.launcher.nodes=2",
                     f"hydra.sweep.dir={sweep}"])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    launcher.launch([["seed=0"]], 0)
    script = executors[0]._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    flags = {line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH")}
    assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--mem-per-gpu=32G", "--cpus-per-task=8",
            "--signal=USR1@120", "--time=720"} <= flags, flags
    assert not any(f.startswith("--mem=") for f in flags)  # --mem and --mem-per-gpu exclude each other
    assert f"--output={sweep}/.submitit/%j_0_log.out" in flags  # no "%j" folder
    assert sweep.is_dir() and not (sweep / ".submitit" / "%j").exists()


# ----------------------------------------------------------------------- ckpt_path=auto

# digits: 20 steps per epoch in one process; GMP from step 4 to 56 every 4 steps
AUTO = ["trainer.max_epochs=4", "sparsity.method.start=4", "sparsity.method.end=56", "sparsity.method.every=4",
        "ckpt_path=auto"]


def test_ckpt_path_auto_starts_fresh_then_resumes_in_the_same_folder(tmp_path):
    straight, job = tmp_path / "straight", tmp_path / "job"
    run(straight, AUTO)  # nothing there yet: a fresh start
    stop = ["+callbacks.stop._target_=tests.test_app.StopAfterEpochs", "+callbacks.stop.epochs=2"]
    first = run(job, [*AUTO, *stop])  # the first attempt, "timed out" after 2 epochs
    assert first["steps"] == 40
    rows_first = list(csv.DictReader((job / "csv" / "metrics.csv").open()))

    again = run(job, AUTO)  # the requeued job: same folder, same command
    assert again["steps"] == 80 and again["sparsity"] == pytest.approx(0.9, abs=1e-3)
    kept = job / "csv" / "metrics.attempt1.csv"  # CSVLogger would have deleted it
    assert list(csv.DictReader(kept.open())) == rows_first
    steps = [int(r["step"]) for r in csv.DictReader((job / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    assert min(steps) >= 40  # the second attempt logs only what it trained
    a = _weights(straight / "checkpoints" / "last.ckpt")["state_dict"]
    b = _weights(job / "checkpoints" / "last.ckpt")["state_dict"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # an epoch-boundary resume is exact


class FakeTrainer:
    """A stand-in for the parts of a Trainer ``resolve_ckpt_path`` reads."""

    def __init__(self, root: Path, last: Path | None):
        self.default_root_dir = str(root)
        self.checkpoint_callbacks = []
        if last is not None:
            from lightning.pytorch.callbacks import ModelCheckpoint

            self.checkpoint_callbacks = [ModelCheckpoint(dirpath=last.parent, save_last=True)]


def test_auto_picks_the_newer_of_last_and_the_requeue_checkpoint(tmp_path):
    from sparsetrain.apps.train import resolve_ckpt_path

    last = tmp_path / "checkpoints" / "last.ckpt"
    trainer = FakeTrainer(tmp_path, last)
    assert resolve_ckpt_path("auto", trainer) is None
    assert resolve_ckpt_path(None, trainer) is None and resolve_ckpt_path("x.ckpt", trainer) == "x.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert resolve_ckpt_path("auto", trainer) == str(last)
    for n, age in ((1, 30), (2, 20), (10, -10)):  # hpc_ckpt_10 is the newest of Lightning's numbering
        hpc = tmp_path / f"hpc_ckpt_{n}.ckpt"
        hpc.write_bytes(b"")
        os.utime(hpc, (last.stat().st_mtime - age,) * 2)
    assert resolve_ckpt_path("auto", trainer) == str(tmp_path / "hpc_ckpt_10.ckpt")
    os.utime(last, (last.stat().st_mtime + 60,) * 2)  # an epoch-end last.ckpt after the requeue checkpoint
    assert resolve_ckpt_path("auto", trainer) == str(last)
    assert resolve_ckpt_path("auto", FakeTrainer(tmp_path, None)) == str(tmp_path / "hpc_ckpt_10.ckpt")


# ------------------------------------------------------------- SLURM requeue, simulated


class RequeueSignalThenKill(pl.Callback):
    """SLURM's ``--signal=USR1@<s>`` at step ``signal_at`` (to every task), then the kill at the time limit."""

    def __init__(self, signal_at: int, kill_at: int):
        self.signal_at, self.kill_at = signal_at, kill_at

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        if trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _srun(tmp_path: Path, run_dir: Path, more: list[str]) -> list[subprocess.CompletedProcess]:
    """Two tasks of one SLURM job step on one node, as srun starts them, running the app."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    port = _free_port()
    cmd = [sys.executable, "-m", "sparsetrain.apps.train", "trainer=slurm_ddp", "hydra.launcher.tasks_per_node=2",
           "trainer.accelerator=cpu", "trainer.sync_batchnorm=false", "trainer.max_epochs=3",
           "sparsity.method.start=2", "sparsity.method.end=24", "sparsity.method.every=2",
           f"hydra.run.dir={run_dir}", *QUIET, *more]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}",
               "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
               "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_JOB_ID": "4242",
               "SLURM_JOB_NAME": "sparsetrain", "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return out


@needs_submitit
@pytest.mark.slow  # four processes that import torch and Lightning, two short DDP fits: ~1-2 min
def test_requeue_signal_checkpoint_then_the_rerun_resumes(tmp_path):
    run_dir = tmp_path / "job"
    kill = ["+callbacks.requeue._target_=tests.test_slurm.RequeueSignalThenKill",
            "+callbacks.requeue.signal_at=15", "+callbacks.requeue.kill_at=17"]
    first = _srun(tmp_path, run_dir, kill)
    assert [p.returncode for p in first] == [-signal.SIGKILL] * 2, first[0].stderr[-3000:]
    hpc = run_dir / "hpc_ckpt_1.ckpt"  # Lightning's SLURM handler, on SIGUSR1
    assert _weights(hpc)["global_step"] == 15
    assert (tmp_path / "scontrol.log").read_text().split("\n")[:-1] == ["requeue 4242"]  # rank 0 only, once

    second = _srun(tmp_path, run_dir, [])  # the requeued job: same command, same folder
    assert [p.returncode for p in second] == [0, 0], second[0].stderr[-3000:]
    assert f"ckpt_path=auto: resuming from {hpc}" in second[0].stderr + second[0].stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30  # 3 epochs x 10 steps per rank (629 digits per rank, batch 64)
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert (run_dir / "csv" / "metrics.attempt1.csv").is_file()
    assert not hpc.exists()  # removed after the fit, or trainer.test under SLURM would have loaded it
    assert summary["test_acc"] is not None


# ----------------------------------------------------------------------- ddp_spawn


@pytest.mark.slow  # spawns two workers for fit and two for test: ~1 min
def test_ddp_spawn_app_writes_the_summary(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "sparsetrain.apps.train", "trainer.devices=2", "+trainer.strategy=ddp_spawn",
         "trainer.accelerator=cpu", "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}", *QUIET],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["steps"], summary["epochs"]) == (20, 2)  # read back from the workers' checkpoint
    assert summary["target_sparsity"] is None  # the workers' method knew it, this process's does not
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3) and summary["test_acc"] is not None
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    assert any(r.get("test/acc") for r in rows) and any(r.get("train/loss") for r in rows)
