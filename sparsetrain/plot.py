"""Plots of sparse-training results: plain matplotlib, drawn with the Agg canvas.

matplotlib is imported inside the functions (``import sparsetrain`` never needs it), and only its
object-oriented API is used (``Figure`` + ``FigureCanvasAgg``), so the global pyplot backend of the
calling process (a notebook, say) is never touched.

* :func:`accuracy_vs_sparsity` - a sweep: accuracy vs sparsity per method, mean ± std over seeds
* :func:`layer_density` - one run: density of every pruned layer (from ``summary.json``'s ``layers``)
* :func:`sparsity_schedule` - one run: target vs measured sparsity over optimizer steps
* :func:`accuracy_vs_density` - lottery tickets: accuracy vs density per run (log scale), dense line
* :func:`write_run_plots` - the last two for a finished run folder; never raises
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

DPI = 120
DENSE_NAMES = ("Dense",)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _pct(x):
    return None if x is None else 100.0 * x


def is_dense_group(group: Mapping) -> bool:
    """A dense reference: the ``Dense`` method, or any method at target sparsity 0."""
    target = group.get("target_sparsity")
    return group.get("method") in DENSE_NAMES or (target is not None and target == 0)


def accuracy_vs_sparsity(
    groups: Sequence[Mapping],
    path,
    *,
    title: str = "Test accuracy vs sparsity",
    ylabel: str = "test accuracy (%)",
    percent: bool = True,
) -> Path:
    """Accuracy (y) vs measured sparsity (x) per method: mean with std error bars over seeds.

    ``groups``: one mapping per (method, target sparsity) with ``method``, ``target_sparsity``,
    ``n_seeds``, ``mean``, ``std`` (``None`` for one seed), ``sparsity_mean`` and optionally
    ``setting`` (e.g. ``"resnet20/cifar10"`` when a sweep mixes models or data; it is added to the
    legend). Accuracies and sparsities are fractions in [0, 1]; ``percent=False`` plots the metric as
    it is. ``Dense`` groups (or, without them, groups at target sparsity 0) also give a dashed
    horizontal reference line with a ±std band. Methods at the same sparsity are drawn a few points
    apart sideways (a display offset only: the data are unchanged) so their error bars stay apart."""
    from matplotlib.transforms import ScaledTranslation

    scale = 100.0 if percent else 1.0
    groups = [g for g in groups if g.get("mean") is not None]
    dense = [g for g in groups if g.get("method") in DENSE_NAMES] or [g for g in groups if is_dense_group(g)]
    curves = [g for g in groups if g.get("method") not in DENSE_NAMES]  # a sparse method's 0 % point stays

    def label(g, name=None):
        name = name or g["method"]
        return f"{name} ({g['setting']})" if g.get("setting") else name

    fig = _figure(7.0, 4.6)
    ax = fig.add_subplot()
    series = list(dict.fromkeys(label(g) for g in curves))
    markers = "osD^vP*Xh<>"
    spread = 10.0  # points between neighbouring methods
    xs_all = []
    at = [round(100.0 * g["sparsity_mean"], 1) for g in curves]
    side_by_side = len(series) > 1 and len(at) > len(set(at))  # some methods share a sparsity
    for i, name in enumerate(series):
        pts = sorted((g for g in curves if label(g) == name), key=lambda g: g["sparsity_mean"])
        x = [100.0 * g["sparsity_mean"] for g in pts]
        xs_all += x
        dx = (i - (len(series) - 1) / 2) * spread / 72.0 if side_by_side else 0.0
        ax.errorbar(
            x,
            [scale * g["mean"] for g in pts],
            yerr=[scale * (g.get("std") or 0.0) for g in pts],
            transform=ax.transData + ScaledTranslation(dx, 0, fig.dpi_scale_trans),
            marker=markers[i % len(markers)],
            markersize=6,
            capsize=4,
            linewidth=1.5,
            label=name,
        )
    if side_by_side:
        ax.text(0.01, 0.01, "methods at equal sparsity are drawn side by side", transform=ax.transAxes,
                fontsize=7, color="0.4")
    styles = ["--", "-.", ":"]
    for j, setting in enumerate(dict.fromkeys(g.get("setting") for g in dense)):
        ref = [g for g in dense if g.get("setting") == setting]
        jobs = sum(g.get("n_seeds", 1) for g in ref)
        mean = sum(g["mean"] * g.get("n_seeds", 1) for g in ref) / jobs
        std = ref[0].get("std") if len(ref) == 1 else None
        name = "Dense" if ref[0]["method"] in DENSE_NAMES else f"{ref[0]['method']} at 0 %"
        ax.axhline(scale * mean, color="0.3", linestyle=styles[j % 3], linewidth=1.3, label=label(ref[0], name))
        if std:
            ax.axhspan(scale * (mean - std), scale * (mean + std), color="0.5", alpha=0.12, linewidth=0)
    # limits by hand: artists drawn with the offset transform do not take part in autoscaling
    ys = [scale * (g["mean"] + sign * (g.get("std") or 0.0)) for g in groups for sign in (-1, 1)]
    if ys:
        lo, hi = min(ys), max(ys)
        pad = max(0.15 * (hi - lo), 0.25 if percent else 1e-3 * max(abs(lo), abs(hi), 1.0))
        ax.set_ylim(lo - pad, min(hi + pad, 100.5) if percent and hi <= 100.0 else hi + pad)
    if xs_all:
        lo, hi = min(xs_all), max(xs_all)
        pad = max(5.0, 0.08 * (hi - lo))
        ax.set_xlim(max(-2.0, lo - pad), min(102.0, hi + pad))
    else:
        ax.set_xlim(-2.0, 102.0)
    ax.set_xlabel("sparsity: prunable weights that are zero (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series or dense:
        ax.legend(loc="best", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no results with this metric", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def layer_density(layers: Mapping[str, Mapping], path, title: str = "Per-layer density") -> Path:
    """Horizontal bars: density (% of weights that are non-zero) of every layer, network order top
    to bottom; ``layers`` is ``summary.json``'s ``{name: {numel, zeros, sparsity}}``."""
    names = list(layers)
    density = [100.0 * (1.0 - float(layers[n]["sparsity"])) for n in names]
    numel = [int(layers[n].get("numel", 0)) for n in names]
    total = sum(numel)
    overall = 100.0 * sum(d / 100.0 * k for d, k in zip(density, numel)) / total if total else None
    small = len(names) > 40
    fig = _figure(8.0, min(1.6 + 0.3 * max(len(names), 1), 40.0))
    ax = fig.add_subplot()
    ypos = list(range(len(names)))
    ax.barh(ypos, density, color="tab:blue", height=0.7)
    ax.set_yticks(ypos, names, fontsize=7 if small else 9)
    for y, d, k in zip(ypos, density, numel):
        ax.text(
            min(d, 100.0) + 1.0,
            y,
            f"{d:.1f} % of {k:,}",
            va="center",
            fontsize=6 if small else 8,
            bbox=dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.8),
        )
    if overall is not None:
        from matplotlib.transforms import blended_transform_factory

        ax.axvline(overall, color="tab:red", linestyle="--", linewidth=1.2)
        ax.text(  # names the dashed line just above the axes, whatever the figure's height
            overall,
            1.0,
            f" all layers: {overall:.1f} %",
            transform=blended_transform_factory(ax.transData, ax.transAxes),
            color="tab:red",
            fontsize=8,
            ha="left",
            va="bottom",
        )
    if names:
        ax.set_ylim(len(names) - 0.5, -0.5)  # network order top to bottom, no empty margins
    ax.set_xlim(0.0, 125.0)  # room for the value labels
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("density: weights that are non-zero (%)")
    ax.set_title(title, pad=14)
    ax.grid(axis="x", alpha=0.3)
    if not names:
        ax.text(0.5, 0.5, "no pruned layers", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def sparsity_schedule(
    steps: Sequence[float], target: Sequence[float], measured: Sequence[float], path, title: str = "Sparsity schedule"
) -> Path:
    """Target and measured sparsity (%, fractions in) over optimizer steps."""
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    ax.plot(
        steps,
        [100.0 * m for m in measured],
        color="tab:blue",
        linewidth=3.0,
        alpha=0.6,
        marker="o" if len(steps) <= 60 else None,
        markersize=4,
        label="measured (zeros in the weights)",
    )
    ax.plot(steps, [100.0 * t for t in target], color="black", linestyle="--", linewidth=1.3, label="target", zorder=3)
    ax.set_ylim(-3.0, 103.0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sparsity of prunable weights (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, path)


def read_schedule(metrics_csv) -> tuple[list[float], list[float], list[float]] | None:
    """``(steps, target, measured)`` from a CSVLogger ``metrics.csv`` with ``sparsity/target`` and
    ``sparsity/global`` columns (rows where both are logged; the last row of a step wins); ``None``
    when the file lacks them."""
    with open(metrics_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        if not {"sparsity/target", "sparsity/global", "step"} <= set(reader.fieldnames or ()):
            return None
        by_step = {}
        for row in reader:
            t, m, s = row.get("sparsity/target"), row.get("sparsity/global"), row.get("step")
            if t and m and s:
                values = float(s), float(t), float(m)
                if all(math.isfinite(v) for v in values):
                    by_step[values[0]] = values[1:]
    if not by_step:
        return None
    steps = sorted(by_step)
    return steps, [by_step[s][0] for s in steps], [by_step[s][1] for s in steps]


def method_name(method) -> str:
    """``"GMP(sparsity=0.9, ...)"`` -> ``"GMP"``; ``{"name": "GMP", "args": {...}}`` -> ``"GMP"``;
    a dotted name keeps its last part."""
    if isinstance(method, Mapping):
        method = method.get("name") or method.get("_target_") or "?"
    text = str(method).strip()
    name = text.split("(", 1)[0].strip() or "?"
    return name.rsplit(".", 1)[-1]


def write_run_plots(output_dir, summary: Mapping) -> list[Path]:
    """``layer_density.png`` and, when a CSV logger's ``metrics.csv`` with the sparsity columns is in
    ``output_dir``, ``sparsity_schedule.png``. Never raises: a failure is logged as a warning (the run
    it plots has finished and its results are already written)."""
    out, written = Path(output_dir), []
    try:
        method = method_name(summary.get("method"))
        what = ", ".join(str(summary[k]) for k in ("model", "data") if summary.get(k))
        seed = summary.get("seed")
        where = f" ({what}{', ' if what else ''}seed {seed})" if seed is not None else (f" ({what})" if what else "")
        sparsity = summary.get("sparsity")
        head = f"{method}, {100 * sparsity:.1f} % sparse" if sparsity is not None else method
        title = f"Per-layer density: {head}{where}"
        written.append(layer_density(summary.get("layers") or {}, out / "layer_density.png", title))
    except Exception as err:  # noqa: BLE001 - a plot must not fail a finished run
        log.warning("could not write %s: %s: %s", out / "layer_density.png", type(err).__name__, err)
    try:
        candidates = [out / "csv" / "metrics.csv", *sorted(out.rglob("metrics.csv"))]
        for metrics in dict.fromkeys(c for c in candidates if c.is_file()):
            schedule = read_schedule(metrics)
            if schedule is not None:
                title = f"Sparsity schedule: {method_name(summary.get('method'))}"
                written.append(sparsity_schedule(*schedule, out / "sparsity_schedule.png", title))
                break
    except Exception as err:  # noqa: BLE001
        log.warning("could not write %s: %s: %s", out / "sparsity_schedule.png", type(err).__name__, err)
    return written


#: legend names of the lottery runs (``result.json``'s ``run``)
LOTTERY_RUNS = {
    "weight": "IMP, weight rewinding",
    "lr": "IMP, learning-rate rewinding",
    "reinit": "control: same masks, random re-init",
    "random_mask": "control: random masks, same layer densities",
}


def accuracy_vs_density(rows: Sequence[Mapping], path, *, title: str = "Lottery tickets: test accuracy vs density") -> Path:
    """Test accuracy (%) vs density (% of prunable weights left, log scale, densest left) per run.

    ``rows``: the lottery's level results (``run``, ``level``, ``density``, ``test_acc``; fractions).
    Level 0 of the main run is the dense network: a dashed reference line. Runs are named in plain
    words (:data:`LOTTERY_RUNS`); rows of one run at the same level (several seeds) are averaged,
    with the standard deviation as error bars.
    """
    fig = _figure(6.4, 4.2)
    ax = fig.subplots()
    dense = [r["test_acc"] for r in rows if r.get("level") == 0 and r.get("test_acc") is not None]
    if dense:
        ax.axhline(100 * sum(dense) / len(dense), color="0.3", linestyle="--", linewidth=1, label="dense (level 0)")
    for run in dict.fromkeys(r["run"] for r in rows):
        by_level: dict[int, list[Mapping]] = {}
        for r in rows:
            if r["run"] == run and r.get("test_acc") is not None and r.get("level", 0) > 0:
                by_level.setdefault(r["level"], []).append(r)
        if not by_level:
            continue
        xs, ys, errs = [], [], []
        for level in sorted(by_level):
            accs = [100 * r["test_acc"] for r in by_level[level]]
            mean = sum(accs) / len(accs)
            xs.append(100 * sum(r["density"] for r in by_level[level]) / len(accs))
            ys.append(mean)
            errs.append(math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0)
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=LOTTERY_RUNS.get(run, run))
    ax.set_xscale("log")
    lowest = min([100 * r["density"] for r in rows if r.get("density")] or [100])
    candidates = (100, 70, 50, 30, 20, 10, 7, 5, 3, 2, 1, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01)
    ticks = [t for t in candidates if t >= lowest * 0.999]
    ticks += [t for t in candidates if t < lowest * 0.999][:1]  # one below the sparsest level
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlim(105, ticks[-1] * 0.95)  # densest left
    ax.minorticks_off()
    ax.set(xlabel="density: prunable weights left (%, log scale)", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
