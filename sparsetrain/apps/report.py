"""``sparsetrain-report``: one table and one plot over a sweep of ``sparsetrain-train`` runs.

    sparsetrain-train -m sparsity=dense,static,gmp seed=0,1,2 hydra.sweep.dir=multirun/study
    sparsetrain-report multirun/study                     # writes into multirun/study/
    sparsetrain-report multirun/study --out results/study --metric val_acc

Every ``summary.json`` under the sweep folder is one job. Jobs are grouped by (method, target
sparsity) - and by model and data where the sweep varies them - and each group becomes one row
(mean and sample standard deviation over its seeds). Written to ``--out`` (default: the sweep folder):

* ``results.md``: the Markdown table (also printed to stdout) and the plot
* ``results.csv``: one row per group; ``results_jobs.csv``: one row per job
* ``accuracy_vs_sparsity.png``: the metric vs the measured sparsity per method, error bars = std

Accuracies and sparsities are fractions in the CSV files and percentages in the table and plot.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from sparsetrain.plot import DENSE_NAMES, accuracy_vs_sparsity, method_name

JOB_COLUMNS = [
    "job",
    "method",
    "target_sparsity",
    "seed",
    "sparsity",
    "test_acc",
    "val_acc",
    "test_loss",
    "wall_time_s",
    "steps",
    "epochs",
    "model",
    "data",
    "method_repr",
]
DASH = "–"


def _warn(msg: str) -> None:
    print(f"sparsetrain-report: warning: {msg}", file=sys.stderr)


def _natural(path: Path, root: Path) -> tuple:
    """Job folders in numeric order: 2 before 10."""
    parts = path.relative_to(root).parts
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def find_summaries(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(
            f"sparsetrain-report: {root} is not a folder (expected a sweep folder of sparsetrain-train runs)"
        )
    found = sorted(root.rglob("summary.json"), key=lambda p: _natural(p, root))
    if not found:
        raise SystemExit(
            f"sparsetrain-report: no summary.json found under {root}; a sparsetrain-train run writes one into its "
            "output folder when it finishes (a sweep: one per job folder, e.g. multirun/<date>/<time>/0/summary.json)"
        )
    return found


def _target(summary: Mapping) -> float | None:
    target = summary.get("target_sparsity")
    method = summary.get("method")
    if target is None and isinstance(method, Mapping):
        target = (method.get("args") or {}).get("sparsity")
    if target is None and isinstance(method, str):
        found = re.search(r"\bsparsity=([-+0-9.eE]+)", method)
        target = float(found.group(1)) if found else None
    return None if target is None else round(float(target), 6)


def load_job(path: Path, root: Path) -> dict | None:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        _warn(f"skipping {path}: {err}")
        return None
    if not isinstance(summary, dict) or "method" not in summary or "sparsity" not in summary:
        _warn(f"skipping {path}: not a sparsetrain-train summary (no 'method' / 'sparsity')")
        return None
    method = summary.get("method")
    job = dict(summary)
    job.update(
        job=str(path.parent.relative_to(root)) or ".",
        method=method_name(method),
        method_repr=json.dumps(method) if isinstance(method, Mapping) else str(method),
        target_sparsity=_target(summary),
    )
    return job


def load_jobs(root: Path) -> list[dict]:
    root = Path(root)
    jobs = [job for job in (load_job(p, root) for p in find_summaries(root)) if job is not None]
    if not jobs:
        raise SystemExit(f"sparsetrain-report: none of the summary.json files under {root} could be read")
    return jobs


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def group_jobs(jobs: Sequence[Mapping], metric: str = "test_acc") -> list[dict]:
    """One dict per (model, data, method, target sparsity): ``n_seeds`` (jobs with a value of
    ``metric``), ``mean``, ``std`` (sample std, ``None`` below two values), ``sparsity_mean``,
    ``wall_time_mean``, ``seeds``; ``setting`` is ``"model/data"`` where the jobs have several."""
    settings = {(j.get("model"), j.get("data")) for j in jobs}
    buckets: dict[tuple, list[Mapping]] = {}
    for job in jobs:
        key = (job.get("model"), job.get("data"), job["method"], job["target_sparsity"])
        buckets.setdefault(key, []).append(job)
    groups = []
    for (model, data, method, target), members in buckets.items():
        values = [v for v in (_number(j.get(metric)) for j in members) if v is not None]
        if len(values) < len(members):
            _warn(f"{len(members) - len(values)} job(s) of {method} at target {target} have no {metric}")
        reprs = {j["method_repr"] for j in members}
        if len(reprs) > 1:
            _warn(f"{method} at target {target} groups jobs with different settings: " + " | ".join(sorted(reprs)))
        sparsities = [v for v in (_number(j.get("sparsity")) for j in members) if v is not None]
        times = [v for v in (_number(j.get("wall_time_s")) for j in members) if v is not None]
        groups.append(
            dict(
                method=method,
                target_sparsity=target,
                n_seeds=len(values),
                mean=_mean(values),
                std=statistics.stdev(values) if len(values) >= 2 else None,
                sparsity_mean=_mean(sparsities),
                wall_time_mean=_mean(times),
                seeds=[j.get("seed") for j in members],
                model=model,
                data=data,
                setting=f"{model}/{data}" if len(settings) > 1 else None,
            )
        )

    def order(g):
        return (
            str(g["model"]),
            str(g["data"]),
            g["method"] not in DENSE_NAMES,
            g["method"],
            -1.0 if g["target_sparsity"] is None else g["target_sparsity"],
        )

    return sorted(groups, key=order)


def _is_fraction(metric: str) -> bool:
    return "acc" in metric


def metric_label(metric: str) -> str:
    if _is_fraction(metric):
        stage = metric.split("_", 1)[0]
        stage = "" if stage in ("acc", "accuracy") else f"{stage} "
        return f"{stage}accuracy (%)"
    return metric.replace("_", " ")


def markdown_table(groups: Sequence[Mapping], metric: str = "test_acc") -> str:
    scale, digits = (100.0, 2) if _is_fraction(metric) else (1.0, 4)
    settings = any(g.get("setting") for g in groups)

    def pct(x, d=1):
        return DASH if x is None else f"{100 * x:.{d}f}"

    header = ["method", *(["model", "data"] if settings else []), "target sparsity (%)", "seeds", metric_label(metric)]
    header += ["measured sparsity (%)", "wall time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    if settings:
        lines[1] = "|---|---|---|" + "|".join(["---:"] * (len(header) - 3)) + "|"
    for g in groups:
        if g["mean"] is None:
            value = DASH
        else:
            std = DASH if g["std"] is None else f"{scale * g['std']:.{digits}f}"
            value = f"{scale * g['mean']:.{digits}f} ± {std}"
        time = DASH if g["wall_time_mean"] is None else f"{g['wall_time_mean']:.1f}"
        row = [g["method"], *([str(g["model"]), str(g["data"])] if settings else [])]
        row += [pct(g["target_sparsity"]), str(g["n_seeds"]), value, pct(g["sparsity_mean"], 2), time]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})


def write_report(root, out=None, metric: str = "test_acc") -> dict:
    """Read the sweep under ``root``, write the files into ``out`` (default ``root``); returns
    ``{"jobs", "groups", "table", "files"}``."""
    root = Path(root)
    out = Path(out) if out is not None else root
    jobs = load_jobs(root)
    if not any(metric in j for j in jobs):
        known = sorted(k for k, v in jobs[0].items() if _number(v) is not None)
        raise SystemExit(
            f"sparsetrain-report: no summary.json has the metric {metric!r}; numbers there: {', '.join(known)}"
        )
    groups = group_jobs(jobs, metric)
    table = markdown_table(groups, metric)
    out.mkdir(parents=True, exist_ok=True)

    group_rows = [
        {
            **g,
            f"{metric}_mean": g["mean"],
            f"{metric}_std": g["std"],
            "seeds": " ".join(str(s) for s in g["seeds"]),
        }
        for g in groups
    ]
    group_columns = ["method", "target_sparsity", "n_seeds", f"{metric}_mean", f"{metric}_std", "sparsity_mean"]
    group_columns += ["wall_time_mean", "seeds", "model", "data"]
    _write_csv(out / "results.csv", group_columns, group_rows)
    _write_csv(out / "results_jobs.csv", JOB_COLUMNS + ([metric] if metric not in JOB_COLUMNS else []), jobs)

    settings = sorted({(str(j.get("model")), str(j.get("data"))) for j in jobs})
    sparse = [g for g in groups if g["method"] not in DENSE_NAMES] or groups  # Dense repeats once per sparsity
    seeds = sorted({g["n_seeds"] for g in sparse})
    on = f": {settings[0][0]} on {settings[0][1]}" if len(settings) == 1 else ""
    n = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    what = metric_label(metric).removesuffix(" (%)").capitalize()
    title = f"{what} vs sparsity{on}\nmean ± std over {n} seed{'s' if n != '1' else ''}"
    png = accuracy_vs_sparsity(
        groups, out / "accuracy_vs_sparsity.png", title=title, ylabel=metric_label(metric), percent=_is_fraction(metric)
    )
    md = [
        f"# Sweep results{on}",
        "",
        f"{len(jobs)} jobs from `{root}` in {len(groups)} groups; {metric_label(metric)}: mean ± sample std over "
        f"seeds ({DASH} for one seed); sparsity counted from the weights; wall time per job.",
        "",
        table,
        "",
        f"![{png.stem.replace('_', ' ')}]({png.name})",
        "",
    ]
    (out / "results.md").write_text("\n".join(md))
    files = [out / "results.md", out / "results.csv", out / "results_jobs.csv", png]
    return {"jobs": jobs, "groups": groups, "table": table, "files": files}


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (returns ``None``: a console script exits with what ``main`` returns)."""
    parser = argparse.ArgumentParser(
        prog="sparsetrain-report",
        description="Table and plot over a sweep of sparsetrain-train runs (every summary.json under SWEEP_DIR).",
    )
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun folder (one subfolder per job)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the results (default: SWEEP_DIR)")
    parser.add_argument("--metric", default="test_acc", help="summary.json key to aggregate (default: test_acc)")
    args = parser.parse_args(argv)
    result = write_report(args.sweep_dir, args.out, args.metric)
    print(result["table"])
    print("wrote " + ", ".join(str(f) for f in result["files"]), file=sys.stderr)


if __name__ == "__main__":
    main()
