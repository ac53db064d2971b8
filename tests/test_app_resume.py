"""The app's default checkpointing survives a killed job: SIGKILL mid-run, resume, same result as straight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from tests.test_app import QUIET, REPO, RESUME, _weights, run


class KillAt(pl.Callback):
    """SIGKILLs its own process after optimizer step ``step``: no handler, no exception hook runs."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def test_sigkill_mid_epoch_then_resume_equals_the_straight_run(tmp_path):
    straight, killed, resumed = tmp_path / "straight", tmp_path / "killed", tmp_path / "resumed"
    app = lambda folder, *more: subprocess.run(  # noqa: E731: the app as a user starts it, one process per job
        [sys.executable, "-m", "sparsetrain.apps.train", f"hydra.run.dir={folder}", *QUIET, *RESUME, *more],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},  # as tests/conftest.py in this process
    )
    assert app(straight).returncode == 0
    job = app(killed, "+callbacks.kill._target_=tests.test_app_resume.KillAt", "+callbacks.kill.step=50")
    assert job.returncode == -signal.SIGKILL, job.stderr[-2000:]
    last = killed / "checkpoints" / "last.ckpt"
    assert _weights(last)["global_step"] == 40  # the end of epoch 2 (20 steps each), not the end of training
    end = run(resumed, [*RESUME, f"ckpt_path={last}"])
    assert end["steps"] == 80
    a = _weights(straight / "checkpoints" / "last.ckpt")["state_dict"]
    b = _weights(resumed / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert Path(end["last_checkpoint"]).is_file()
