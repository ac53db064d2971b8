"""Two-process DDP on CPU: every rank holds identical masks after every step."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_masks.py")


@pytest.mark.parametrize("method", ["gmp", "static"])
def test_masks_identical_on_both_ranks(tmp_path, method):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), method], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(rank0["history"]) == len(rank1["history"]) == 16  # 128 samples / 2 ranks / batch 8 * 2 epochs
    for step, (m0, m1) in enumerate(zip(rank0["history"], rank1["history"])):
        for name in m0:
            assert torch.equal(m0[name], m1[name]), (step, name)
    for name in rank0["weights"]:
        assert torch.equal(rank0["weights"][name], rank1["weights"][name])
    final = rank0["history"][-1]
    kept = sum(int(m.sum()) for m in final.values())
    total = sum(m.numel() for m in final.values())
    assert kept == round(0.2 * total)
    if method == "gmp":  # the masks did change during training
        assert not all(torch.equal(rank0["history"][0][n], final[n]) for n in final)


def test_diverging_masks_are_caught(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "rank_dependent"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "sparsity masks differ across DDP ranks at step 0" in result.stderr
