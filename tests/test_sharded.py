"""Sharded parameters (FSDP2 through Lightning's ModelParallelStrategy) are refused at fit start with a clear
message, instead of per-shard masks and a wrong reported sparsity."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsetrain.core.errors import SparsityConfigError  # noqa: F401  (the error the script raises)

pytest.importorskip("torch.distributed.fsdp")


@pytest.mark.slow  # a process group and FSDP2 in a subprocess: ~10-50 s
def test_fsdp2_sharded_parameters_fail_at_fit_start():
    script = Path(__file__).with_name("sharded_refused.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0 and "TRAINED" not in done.stdout
    assert "SparsityConfigError: SparsityCallback does not support sharded parameters yet" in done.stderr
    assert "['fc1.weight', 'fc2.weight'] are DTensors" in done.stderr
