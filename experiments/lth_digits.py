"""Lottery tickets on the bundled digits: accuracy vs density for weight rewinding and the reinit control.

For every seed: ``sparsetrain-lottery experiment=lth_lenet_digits seed=S`` (LeNet-300-100, IMP with
rewinding to initialisation, 18 levels of p = 0.2 down to 1.8 % density, 20 epochs per level), then
the same with ``lottery.control=reinit`` (each level's masks trained from a fresh init). Then the
mean and std over seeds go to ``<out>/lth_digits.{csv,md,png}`` (default experiments/results/; ``--out DIR``).

    python experiments/lth_digits.py                       # 3 seeds, ~20 min on 2 CPU cores
    python experiments/lth_digits.py --seeds 0 --levels 4  # a quick look

Runs live in ``outputs/lottery/lth_lenet_digits/`` and resume where they stopped.
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from matplotlib.figure import Figure

from sparsetrain.apps.lottery import lottery_from_config
from sparsetrain.apps.train import config_dir

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = {"weight": "weight rewinding (k = 0)", "reinit": "reinit control"}


def run(seed: int, levels: int, epochs: int, control: str) -> list[dict]:
    overrides = ["experiment=lth_lenet_digits", f"seed={seed}", f"lottery.levels={levels}", f"lottery.control={control}",
                 f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("lottery", overrides=overrides)
    return lottery_from_config(cfg).run()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--levels", type=int, default=18)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: experiments/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    started, rows = time.perf_counter(), []
    for seed in args.seeds:
        for control in ("none", "reinit"):
            for r in run(seed, args.levels, args.epochs, control):
                rows.append({**r, "seed": seed})
            print(f"seed {seed} {control}: done at {time.perf_counter() - started:.0f} s", flush=True)
    minutes = (sum(r["wall_time_s"] for r in rows) / 60, (time.perf_counter() - started) / 60)
    table = aggregate(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "lth_digits.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["run", "seed", "level", "density", "test_acc", "test_acc_final", "val_acc"])
        writer.writeheader()
        writer.writerows([{k: r[k] for k in writer.fieldnames} for r in rows])
    write_markdown(table, args, minutes, args.out / "lth_digits.md")
    plot(table, args.out / "lth_digits.png")
    print((args.out / "lth_digits.md").read_text())


def aggregate(rows: list[dict]) -> dict:
    """``{(run, level): {density, acc (list over seeds), acc_final (list)}}``."""
    table: dict = {}
    for r in rows:
        cell = table.setdefault((r["run"], r["level"]), {"density": r["density"], "acc": [], "final": []})
        cell["acc"].append(r["test_acc"])
        cell["final"].append(r["test_acc_final"])
    return table


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def findings(table: dict) -> list[str]:
    """What the numbers say, in words computed from them (mean test accuracy, best-val checkpoints)."""
    mean = {key: 100 * statistics.mean(c["acc"]) for key, c in table.items()}
    final = {key: 100 * statistics.mean(c["final"]) for key, c in table.items()}
    levels = sorted(level for run, level in table if run == "weight")
    dense, last = mean[("weight", 0)], levels[-1]
    lines = [f"At {100 * table[('weight', last)]['density']:.2f} % density the tickets (weight rewinding) reach "
             f"{mean[('weight', last)]:.1f} % (dense: {dense:.1f} %)"
             + (f", the reinit control {mean[('reinit', last)]:.1f} %." if ("reinit", last) in mean else ".")]
    for run in ("weight", "reinit"):
        ok = [lv for lv in levels if (run, lv) in mean and all(mean.get((run, m), 0) >= dense - 2 for m in levels[1:lv + 1])]
        if ok:
            lines.append(f"{RUNS[run].capitalize()} stays within 2 points of dense down to "
                         f"{100 * table[(run, ok[-1])]['density']:.2f} % density (all levels up to {ok[-1]}).")
    if statistics.mean(final[("weight", lv)] for lv in levels) > statistics.mean(mean[("weight", lv)] for lv in levels):
        lines.append("For the tickets 'final' is above 'best': the best-val checkpoint is the first epoch that "
                     "reaches the highest accuracy on the 270 validation digits (steps of 0.37 %), often an early one.")
    return lines


def write_markdown(table: dict, args, minutes: tuple[float, float], path: Path) -> None:
    levels = sorted({level for _, level in table})
    lines = [
        "# Lottery tickets on digits: weight rewinding vs reinit",
        "",
        f"LeNet-300-100 (64-300-100-10) on scikit-learn's 8x8 digits (1257/270/270 split), IMP with global "
        f"magnitude pruning of p = 0.2 per level over all three weight matrices and rewinding to "
        f"initialisation (k = 0); SGD lr 0.1, no momentum, batch 64, {args.epochs} epochs (20 steps each) per "
        f"level. Test accuracy in % (mean ± std over seeds {', '.join(map(str, args.seeds))}): 'best' = the "
        "checkpoint with the best validation accuracy, 'final' = the weights after the last epoch. The "
        "reinit control trains the same masks from a fresh random init (seed + 10000).",
        "",
        "| level | density | weight rewinding, best | reinit, best | weight rewinding, final | reinit, final |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for level in levels:
        w, r = table.get(("weight", level)), table.get(("reinit", level))
        cells = [_ms(c[key]) if c else "" for key in ("acc", "final") for c in (w, r)]
        lines.append(f"| {level} | {100 * w['density']:.2f} % | " + " | ".join(cells) + " |")
    lines += ["", *findings(table), "",
              f"Made by `{' '.join(['python experiments/lth_digits.py', *sys.argv[1:]])}`" +
              f" on 2 shared CPU cores: {minutes[0]:.1f} min of training summed over all levels "
              f"({minutes[1]:.1f} min for this invocation; finished levels are read back, not retrained).", ""]
    path.write_text("\n".join(lines))


def plot(table: dict, path: Path) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for run, label in RUNS.items():
        cells = sorted((c["density"], c) for (name, _), c in table.items() if name == run)
        if not cells:
            continue
        x = [100 * d for d, _ in cells]
        mean = [100 * statistics.mean(c["acc"]) for _, c in cells]
        sd = [100 * statistics.stdev(c["acc"]) if len(c["acc"]) > 1 else 0.0 for _, c in cells]
        ax.plot(x, mean, marker="o", label=label)
        ax.fill_between(x, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], alpha=0.2)
    ax.set(xscale="log", xlabel="density (% of weights left)", ylabel="test accuracy (%), best-val checkpoint",
           title="LeNet-300-100 on digits: IMP, mean ± std over seeds")
    ticks = [100, 50, 20, 10, 5, 2]
    ax.set_xticks(ticks, [f"{t} %" for t in ticks])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
