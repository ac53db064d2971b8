"""Runs ``bench_overhead.py`` over a grid of models, image sizes and batch sizes, then writes the summary table.

    python experiments/bench_overhead_grid.py                  # the CPU grid (about an hour on 2 cores)
    python experiments/bench_overhead_grid.py --device cuda    # the GPU grid, bf16
    python experiments/bench_overhead_grid.py --summary-only   # rebuild the summary from the per-row CSVs
    python experiments/bench_overhead_grid.py --resume         # run only the rows not written yet

Each row writes ``<out>/overhead_<device>_<model>_<size>_b<batch>.{md,csv}`` (default experiments/results/;
``--out DIR`` to change it); the summary, ``<out>/overhead_summary_<device>.{md,csv}``, is built from every
such CSV present in ``<out>``, and ``--resume`` skips the rows whose CSV is in ``<out>``.
Rounds and steps per row are chosen so that a row takes minutes on its device; the biggest CPU
rows run fewer methods (the compiled kernel, slower than eager on CPU, only where it is cheap).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from bench_overhead import METHODS, PROFILED_RUNS, RESULTS, benchmark, write_results

NO_COMPILED = METHODS.replace(",gmp_compiled", "")

# (model, image size, batch size, rounds, steps, methods, ViT patch size, profiled runs). Batch 1 runs at
# 224x224 for ResNets: at 32x32 their last BatchNorm sees 1x1 maps, one value per channel, and refuses to train.
GRID = {
    "cpu": [
        ("resnet18", 32, 64, 4, 4, METHODS, 16, 2),
        ("resnet50", 224, 32, 2, 2, "dense,gmp,static,torch_prune", 16, 1),
        ("resnet18", 224, 1, 3, 4, NO_COMPILED, 16, 2),
        ("resnet50", 224, 1, 3, 3, NO_COMPILED, 16, 2),
        ("resnet18", 32, 32, 4, 4, NO_COMPILED, 16, 2),
        ("resnet50", 32, 32, 3, 3, NO_COMPILED, 16, 2),
        ("vit_tiny_patch16_224", 32, 1, 4, 8, NO_COMPILED, 4, 2),
        ("vit_tiny_patch16_224", 32, 32, 4, 4, NO_COMPILED, 4, 2),
        ("resnet18", 32, 128, 3, 3, NO_COMPILED, 16, 2),
        ("resnet50", 32, 128, 2, 2, NO_COMPILED, 16, 2),
    ],
    "cuda": [  # not run yet (no GPU in the sessions so far); sized for about 20 minutes on an H100
        (model, size, batch, 5, 10, METHODS, 16, 2)
        for model in ("resnet18", "resnet50")
        for size in (32, 224)
        for batch in (1, 32, 128)
        if (size, batch) != (32, 1)
    ]
    + [("vit_small_patch16_224", 224, batch, 5, 10, METHODS, 16, 2) for batch in (1, 32, 128)],
}

LABELS = {"gmp": "GMP", "static": "static", "rigl": "RigL", "torch_prune": "torch prune", "modelpruning": "ModelPruning"}


def overhead(rows: dict, method: str) -> str:
    r = rows.get(method)
    return "–" if r is None else f"{(float(r['ratio_vs_dense']) - 1) * 100:+.1f} %"


def separation(rows: dict, peer: str) -> str:
    r = rows.get(peer)
    if r is None or not r["gap_to_gmp"]:
        return "–"
    low, gap = float(r["gap_ci_low"]), float(r["gap_to_gmp"])
    return f"yes ({gap * 100:+.1f})" if low > 0 else f"no ({gap * 100:+.1f})"


def added(rows: dict, method: str) -> str:
    r = rows.get(method)
    return "–" if r is None or not r["added_work_vs_dense_step"] else f"{float(r['added_work_vs_dense_step']) * 100:.2f} %"


def apart(rows: dict, peer: str) -> str:
    """Is the peer's profiled added work above GMP's in every profiled run, and by what factor."""
    r, gmp = rows.get(peer), rows.get("gmp")
    if r is None or gmp is None or not r["added_work_ms"]:
        return "–"
    factor = float(r["added_work_ms"]) / float(gmp["added_work_ms"])
    return f"{'yes' if float(r['added_work_min_ms']) > float(gmp['added_work_max_ms']) else 'no'} ({factor:.1f}x)"


def table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def summarise(device: str, out: Path = RESULTS) -> None:
    tables = []
    for path in sorted(out.glob(f"overhead_{device}_*_b*.csv")):
        with open(path) as f:
            tables.append({r["method"]: r for r in csv.DictReader(f)})
    if not tables:
        raise SystemExit(f"no overhead_{device}_*_b*.csv in {out}")
    tables.sort(key=lambda t: (t["dense"]["model"], int(t["dense"]["image_size"]), int(t["dense"]["batch_size"])))
    config = [[t["dense"]["model"], t["dense"]["image_size"], t["dense"]["batch_size"]] for t in tables]
    dense_ms = [f"{float(t['dense']['median_step_ms']):.1f}" for t in tables]
    added_table = table(
        ["model", "image", "batch", "dense step (ms)", "GMP", "static", "RigL (every=100)", "torch prune",
         "ModelPruning", "GMP below torch prune in every run", "GMP below ModelPruning in every run"],
        [c + [d] + [added(t, m) for m in ("gmp", "static", "rigl", "torch_prune", "modelpruning")]
         + [apart(t, "torch_prune"), apart(t, "modelpruning")] for c, d, t in zip(config, dense_ms, tables)],
    )  # fmt: skip
    step_table = table(
        ["model", "image", "batch", "noise floor (dense again)", "GMP", "static", "RigL (every=100)", "torch prune",
         "ModelPruning", "GMP below torch prune beyond noise", "GMP below ModelPruning beyond noise"],
        [c + [overhead(t, m) for m in ("dense_again", "gmp", "static", "rigl", "torch_prune", "modelpruning")]
         + [separation(t, "torch_prune"), separation(t, "modelpruning")] for c, t in zip(config, tables)],
    )  # fmt: skip
    command = "python experiments/bench_overhead_grid.py" + (" --device cuda" if device == "cuda" else "")
    lines = [
        f"# Overhead against dense, {device.upper()}, 90 % sparse",
        "",
        f"Made by `{command}`; the file of each row beside this one gives the ranges and intervals, the rounds and "
        "the exact command.",
        "",
        "## Work each method adds per step, profiled, in % of a dense step",
        "",
        "sparsetrain: its per-step hooks; torch.nn.utils.prune and ModelPruning: the forward hooks computing "
        "weight_orig * weight_mask and the backward of that multiply. Last two columns: the peer's added work "
        "was above GMP's in every profiled run (factor: peer / GMP).",
        "",
        *added_table,
        "",
        "## Whole training steps against dense",
        "",
        "Median over rounds of (method step / dense step of the same round) - 1. Last two columns: the 95 % "
        "interval of the paired gap (peer step - GMP step, in dense steps) is above zero; the number is the gap in %.",
        "",
        *step_table,
    ]
    (out / f"overhead_summary_{device}.md").write_text("\n".join(lines) + "\n")
    rows = [r for t in tables for r in t.values()]
    with open(out / f"overhead_summary_{device}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=sorted(GRID))
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--resume", action="store_true", help="skip the rows whose CSV is already there")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: experiments/results)")
    args = parser.parse_args()
    if not args.summary_only:
        for model, size, batch, rounds, steps, methods, patch, profiled in GRID[args.device]:
            if args.resume and (args.out / f"overhead_{args.device}_{model}_{size}_b{batch}.csv").exists():
                continue
            print(f"== {model} {size}x{size} batch {batch} ({rounds} rounds x {steps} steps)", flush=True)
            rows, update_s, _ = benchmark(model, size, batch, rounds, steps, methods, args.device, patch, profiled)
            vit = f"--patch-size {patch} " if model.startswith("vit_") else ""
            command = (
                f"python experiments/bench_overhead.py --model {model} {vit}--image-size {size} --batch-size {batch} "
                f"--rounds {rounds} --steps {steps} --device {args.device}"
                + ("" if methods == METHODS else f" --methods {methods}")
                + ("" if profiled == PROFILED_RUNS else f" --profiled-runs {profiled}")
            )
            write_results(rows, update_s, profiled, command, args.out)
    summarise(args.device, args.out)


if __name__ == "__main__":
    main()
