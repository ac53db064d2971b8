"""``sparsetrain-report`` over a real 4-job sweep of the training app (2 methods x 2 seeds on digits,
a few steps each), the per-run plots the app writes, and the report's errors. All on CPU."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from sparsetrain.apps.report import main, write_report
from sparsetrain.plot import method_name, write_run_plots
from tests.test_app import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# two epochs of 3 optimizer steps, one val and one test batch: GMP reaches 90 % by its `end` (0.7)
FAST = [
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
]
JOBS = [(method, seed) for method in ("gmp", "static") for seed in (0, 1)]


def assert_png(path: Path, colours: int = 1) -> None:
    """A PNG that matplotlib reads, with marks in ``colours`` of matplotlib's first default colours
    (tab:blue, tab:orange, ...) - so a plot whose data fell outside its axes fails."""
    import matplotlib.image
    import numpy as np

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, image.shape
    for rgb in [(0.122, 0.467, 0.706), (1.0, 0.498, 0.055)][:colours]:
        near = (np.abs(image[..., :3] - np.array(rgb)) < 0.03).all(axis=-1)
        assert near.sum() > 200, f"{path.name}: little drawn in {rgb} (the legend alone has ~120 pixels)"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A Hydra-multirun-shaped folder: one numbered subfolder per job, each with its summary.json."""
    root = tmp_path_factory.mktemp("sweep")
    for i, (method, seed) in enumerate(JOBS):
        run(root / str(i), [f"sparsity={method}", f"seed={seed}", *FAST])
    return root


def test_sweep_report(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    main([str(sweep), "--out", str(out)])
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(len(JOBS))]

    groups = read_csv(out / "results.csv")
    assert [(g["method"], float(g["target_sparsity"])) for g in groups] == [("GMP", 0.9), ("Static", 0.9)]
    for group in groups:
        jobs = [s for s in summaries if s["method"].startswith(group["method"] + "(")]
        assert int(group["n_seeds"]) == len(jobs) == 2
        assert sorted(group["seeds"].split()) == ["0", "1"]
        accs = [s["test_acc"] for s in jobs]
        assert float(group["test_acc_mean"]) == pytest.approx(statistics.fmean(accs))
        assert float(group["test_acc_std"]) == pytest.approx(statistics.stdev(accs))
        assert float(group["sparsity_mean"]) == pytest.approx(statistics.fmean(s["sparsity"] for s in jobs))
        assert float(group["sparsity_mean"]) == pytest.approx(0.9, abs=1e-3)
        assert float(group["wall_time_mean"]) == pytest.approx(statistics.fmean(s["wall_time_s"] for s in jobs))

    jobs = read_csv(out / "results_jobs.csv")
    assert [j["job"] for j in jobs] == ["0", "1", "2", "3"]
    assert [(j["method"], j["seed"]) for j in jobs] == [("GMP", "0"), ("GMP", "1"), ("Static", "0"), ("Static", "1")]
    assert [float(j["test_acc"]) for j in jobs] == pytest.approx([s["test_acc"] for s in summaries])

    assert_png(out / "accuracy_vs_sparsity.png", colours=2)  # GMP and Static
    md = (out / "results.md").read_text()
    assert "| GMP |" in md and "| Static |" in md and " ± " in md
    assert "accuracy_vs_sparsity.png" in md
    printed = capsys.readouterr().out
    assert "| GMP |" in printed and "| Static |" in printed


def test_run_writes_its_plots(sweep):
    for i, (method, _) in enumerate(JOBS):
        assert_png(sweep / str(i) / "layer_density.png")
        assert_png(sweep / str(i) / "sparsity_schedule.png", colours=0)  # the default config logs to csv/metrics.csv


def test_run_without_logger_writes_density_plot_only(tmp_path):
    run(tmp_path, [*FAST, "~logger", "trainer.max_epochs=1"])
    assert_png(tmp_path / "layer_density.png")
    assert not (tmp_path / "sparsity_schedule.png").exists()


def test_run_plots_never_raise(tmp_path, caplog):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("step,sparsity/target,sparsity/global\n0,0.5,oops\n")
    with caplog.at_level("WARNING"):
        written = write_run_plots(tmp_path, {"layers": {"fc.weight": {"numel": 4}}, "method": "GMP()"})
    assert written == []
    assert "layer_density.png" in caplog.text and "sparsity_schedule.png" in caplog.text


def test_no_summary_is_a_clear_error(tmp_path):
    (tmp_path / "0").mkdir()
    with pytest.raises(SystemExit, match="no summary.json found under"):
        main([str(tmp_path)])
    with pytest.raises(SystemExit, match="is not a folder"):
        main([str(tmp_path / "missing")])


def fake_job(folder: Path, method, acc: float, sparsity: float, target=None, seed=0) -> None:
    folder.mkdir(parents=True)
    layers = {"fc.weight": {"numel": 10, "zeros": round(10 * sparsity), "sparsity": sparsity}}
    summary = dict(test_acc=acc, sparsity=sparsity, target_sparsity=target, layers=layers, method=method)
    summary.update(model="m", data="d", seed=seed, wall_time_s=1.0, steps=1)
    (folder / "summary.json").write_text(json.dumps(summary))


def test_dense_reference_single_seed_and_dict_method(tmp_path, capsys):
    fake_job(tmp_path / "0", "Dense()", 0.99, 0.0, target=0.0)
    fake_job(tmp_path / "1", {"name": "RigL", "args": {"sparsity": 0.8}}, 0.97, 0.8)  # target from the args
    fake_job(tmp_path / "2", {"name": "RigL", "args": {"sparsity": 0.8}}, 0.95, 0.8, seed=1)
    fake_job(tmp_path / "3", "sparsetrain.methods.GMP(sparsity=0.9)", 0.9, 0.9)  # target from the repr
    fake_job(tmp_path / "10" / "nested", "sparsetrain.methods.GMP(sparsity=0.9)", 0.92, 0.9, seed=1)
    result = write_report(tmp_path, metric="test_acc")
    by_method = {g["method"]: g for g in result["groups"]}
    assert list(by_method) == ["Dense", "GMP", "RigL"]
    assert by_method["RigL"]["target_sparsity"] == 0.8 and by_method["RigL"]["mean"] == pytest.approx(0.96)
    assert by_method["GMP"]["target_sparsity"] == 0.9 and by_method["GMP"]["n_seeds"] == 2
    assert by_method["Dense"]["n_seeds"] == 1 and by_method["Dense"]["std"] is None
    assert "| Dense | 0.0 | 1 | 99.00 ± – |" in result["table"]
    assert_png(tmp_path / "accuracy_vs_sparsity.png", colours=2)  # GMP and RigL; Dense is the grey line
    with pytest.raises(SystemExit, match="no summary.json has the metric 'nope'"):
        write_report(tmp_path, metric="nope")


@pytest.mark.parametrize(
    "method, name",
    [
        ("GMP(sparsity=0.9, start=0.1)", "GMP"),
        ("Dense()", "Dense"),
        ({"name": "RigL", "args": {}}, "RigL"),
        ({"name": "sparsetrain.methods.SET"}, "SET"),
        ("FixedMasks(density=0.1000, layers=3)", "FixedMasks"),
    ],
)
def test_method_name(method, name):
    assert method_name(method) == name
