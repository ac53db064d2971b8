"""The overhead benchmark still runs and measures what it says (slow: a few short Trainer runs)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))


@pytest.mark.slow
def test_overhead_benchmark_measures_memory_and_added_work():
    from bench_overhead import benchmark

    rows, update_s, profiled_runs = benchmark(
        "resnet18", image_size=32, batch_size=2, rounds=1, steps=2, methods="dense,gmp,torch_prune", profiled_runs=1
    )
    by_method = {r["method"]: r for r in rows}
    assert list(by_method) == ["dense", "gmp", "torch_prune"] and profiled_runs == 1 and update_s > 0
    assert by_method["dense"]["ratio_vs_dense"] == 1.0 and by_method["dense"]["added_work_ms"] is None
    assert by_method["dense"]["extra_bytes_per_weight"] == 0.0
    assert by_method["gmp"]["extra_bytes_per_weight"] == 1.0  # one bool per target weight
    assert by_method["torch_prune"]["extra_bytes_per_weight"] == 8.0  # float mask + recomputed weight
    assert by_method["gmp"]["added_work_ms"] > 0 and by_method["gmp"]["mask_work_ms"] > 0
    assert by_method["torch_prune"]["added_work_ms"] > 0 and by_method["torch_prune"]["mask_work_ms"] is None
    assert by_method["torch_prune"]["gap_to_gmp"] is not None and by_method["gmp"]["gap_to_gmp"] is None
    assert all(r["timed_steps"] == 2 for r in rows)
