"""sparsetrain.core.fingerprint: the mask hashes of the cross-rank check (nonlinear, no nonzero, no
host sync, the same on every device) and their comparison across two real DDP processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsetrain.core import fingerprint
from sparsetrain.core.fingerprint import compare_across_ranks, disagreeing, mask_hash_reference, mask_hashes


def old_fingerprint(mask: torch.Tensor) -> torch.Tensor:
    """``SparsityCallback._fingerprint`` before this module (linear in the kept positions)."""
    positions = mask.reshape(-1).nonzero().squeeze(1)
    return torch.stack([positions.numel() * torch.ones((), dtype=torch.int64, device=mask.device),
                        (positions * 2654435761 % 2147483647).sum()])


def mask_with(n: int, positions) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[list(positions)] = True
    return m


def h(mask: torch.Tensor) -> int:
    return int(mask_hashes([mask])[0])


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 1000, 4099])
def test_matches_the_plain_python_definition(n):
    g = torch.Generator().manual_seed(n)
    for density in (0.0, 0.3, 1.0):
        mask = torch.rand(n, generator=g) < density
        assert h(mask) == mask_hash_reference(mask)


@pytest.mark.parametrize("chunk", [1, 3, 1 << 15])
def test_the_cpu_pieces_do_not_change_the_hash(monkeypatch, chunk):
    mask = torch.rand(64 * 50 + 13, generator=torch.Generator().manual_seed(1)) < 0.5
    expected = mask_hash_reference(mask)
    monkeypatch.setattr(fingerprint, "CPU_CHUNK_BLOCKS", chunk)
    assert h(mask) == expected


def test_layout_does_not_matter_only_the_bits():
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(37, 53, generator=g) < 0.4
    wide = torch.rand(40, 60, generator=g) < 0.4
    wide[:37, :53] = mask
    strided = wide[:37, :53]  # not contiguous, storage offset 0
    shifted = torch.cat([torch.zeros(3, dtype=torch.bool), mask.reshape(-1)])[3:]  # offset not a multiple of 8
    transposed = mask.t().contiguous().t()  # same values, column-major storage
    hashes = mask_hashes([mask, mask.clone(), strided, shifted, transposed, mask.reshape(-1)])
    assert hashes.dtype == torch.int64 and hashes.shape == (6,)
    assert len(set(hashes.tolist())) == 1
    assert hashes[0] == mask_hash_reference(mask)


def test_the_old_collisions_are_told_apart():
    # the old scheme is a sum over positions of (p * a mod m): {0,3} and {1,2} give the same number
    a, b = mask_with(4, [0, 3]), mask_with(4, [1, 2])
    assert torch.equal(old_fingerprint(a), old_fingerprint(b))
    assert h(a) != h(b)
    # opposite one-position shifts of two kept weights (no term wraps): same old fingerprint
    base = torch.rand(4096, generator=torch.Generator().manual_seed(3)) < 0.1
    kept = base.nonzero().squeeze(1).tolist()
    pairs = 0
    for i, j in zip(kept[:-1], kept[1:]):
        if i + 1 < j - 1 and not base[i + 1] and not base[j - 1]:
            moved = base.clone()
            moved[[i, j]] = False
            moved[[i + 1, j - 1]] = True
            if torch.equal(old_fingerprint(moved), old_fingerprint(base)):
                pairs += 1
                assert h(moved) != h(base)
    assert pairs > 10


def test_many_near_identical_masks_get_distinct_hashes():
    base = torch.rand(3000, generator=torch.Generator().manual_seed(4)) < 0.5
    variants = [base]
    for p in range(base.numel()):  # every single-bit flip
        m = base.clone()
        m[p] = ~m[p]
        variants.append(m)
    for p in range(0, base.numel() - 1, 2):  # swaps of neighbours
        m = base.clone()
        m[[p, p + 1]] = base[[p + 1, p]]
        if not torch.equal(m, base):
            variants.append(m)
    hashes = mask_hashes(variants).tolist()
    assert len(set(hashes)) == len(hashes)


def test_size_is_mixed_in_and_hashes_are_63_bit():
    zeros = [torch.zeros(n, dtype=torch.bool) for n in (0, 1, 8, 9, 64, 65)]
    ones = [torch.ones(n, dtype=torch.bool) for n in (1, 8, 9, 64, 65)]
    hashes = mask_hashes(zeros + ones)
    assert len(set(hashes.tolist())) == len(zeros) + len(ones)
    assert bool((hashes >= 0).all())
    assert mask_hashes([]).shape == (0,)


def test_rejects_non_bool_masks():
    with pytest.raises(TypeError, match="bool masks"):
        mask_hashes([torch.ones(3)])


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_no_nonzero_and_no_host_sync():
    masks = [torch.rand(s, generator=torch.Generator().manual_seed(5)) < 0.2 for s in [(64, 3, 3, 3), (1000,), (7,)]]
    with RecordOps() as rec:
        mask_hashes(masks)
    assert not {op for op in rec.ops if "nonzero" in op or "_local_scalar_dense" in op or "item" in op}, rec.ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_same_hash_on_cuda():
    masks = [torch.rand(s, generator=torch.Generator().manual_seed(6)) < 0.3 for s in [(256, 128, 3, 3), (1000,), (5,)]]
    cpu = mask_hashes(masks)
    cuda = mask_hashes([m.cuda() for m in masks])
    assert cuda.device.type == "cuda"
    assert torch.equal(cpu, cuda.cpu())


def test_disagreeing_reads_max_and_minus_min():
    # three layers, the MAX all-reduce of [h, -h] over ranks holding (5, 7, 9) and (5, 8, 9)
    reduced = torch.tensor([5, 8, 9, -5, -7, -9])
    assert disagreeing(reduced).tolist() == [1]


def test_compare_on_one_device_is_the_identity():
    from lightning.pytorch.strategies import SingleDeviceStrategy

    strategy = SingleDeviceStrategy(device=torch.device("cpu"))
    assert compare_across_ranks(mask_hashes([torch.ones(3, dtype=torch.bool)]), strategy) == []


@pytest.mark.slow  # two processes that import torch and Lightning: ~17 s here
def test_two_ddp_ranks_detect_a_rank_different_mask(tmp_path):
    script = Path(__file__).with_name("ddp_fingerprint.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["agree"] == r1["agree"] == []
    assert r0["differ"] == r1["differ"] == [2]  # every rank gets the same answer
    assert r0["hashes"][:2] == r1["hashes"][:2] and r0["hashes"][2] != r1["hashes"][2]
    assert not r0["old_scheme_sees_a_difference"]  # {0,3} against {1,2}: the old fingerprint is blind to it
