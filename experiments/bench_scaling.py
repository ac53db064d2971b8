"""Per-step mask overhead vs number of target weights (5 M to 100 M), CPU.

The work sparsetrain adds to a training step is one pass over the targets: zero the
masked gradients before the optimizer step (with ``reapply="always"``, or an optimizer
outside the SGD/Adam family, a second pass re-applies the masks to the weights after it).
Neither touches activations, so it cannot depend on the batch size; this script measures
how it grows with the number of weights. Targets are conv-shaped tensors (512x512x3x3,
2.36 M weights each) with a 90 % sparse bool mask; each point is the median of repeated
applications with the eager and, with ``--compiled``, the compiled kernel.

    python experiments/bench_scaling.py [--compiled]

Writes ``<out>/scaling_cpu.csv``, ``scaling_cpu.md`` and ``scaling_cpu.png`` (default experiments/results/;
``--out DIR`` to change it).
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import torch

from sparsetrain.core.kernels import MaskKernel

RESULTS = Path(__file__).parent / "results"
LAYER = (512, 512, 3, 3)


def step_overhead_ms(n_weights: int, kernel: MaskKernel, repeats: int) -> tuple[float, float, int]:
    """Median ms of the gradient pass alone and of gradient + weight passes."""
    n_layers = max(1, round(n_weights / torch.Size(LAYER).numel()))
    weights = [torch.randn(LAYER) for _ in range(n_layers)]
    grads = [torch.randn(LAYER) for _ in range(n_layers)]
    masks = [torch.rand(LAYER) > 0.9 for _ in range(n_layers)]
    kernel(grads, masks)  # warm-up (and compilation)
    kernel(weights, masks)
    one, two = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        kernel(grads, masks)
        t1 = time.perf_counter()
        kernel(weights, masks)
        t2 = time.perf_counter()
        one.append(t1 - t0)
        two.append(t2 - t0)
    return statistics.median(one) * 1000, statistics.median(two) * 1000, n_layers * torch.Size(LAYER).numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="5,10,25,50,75,100", help="millions of target weights")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--compiled", action="store_true", help="also time the torch.compile kernel")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: experiments/results)")
    args = parser.parse_args()

    kinds = ["eager"] + (["compiled"] if args.compiled else [])
    rows = []
    for millions in (float(m) for m in args.sizes.split(",")):
        for kind in kinds:
            one, two, n = step_overhead_ms(int(millions * 1e6), MaskKernel(kind), args.repeats)
            rows.append(
                {
                    "kernel": kind,
                    "target_weights": n,
                    "one_pass_ms": round(one, 2),
                    "two_passes_ms": round(two, 2),
                    "ns_per_weight_per_pass": round(two * 1e6 / n / 2, 3),
                }
            )
            print(rows[-1], flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "scaling_cpu.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind in kinds:
        for key, style, label in (("one_pass_ms", "o-", "grads only (default)"), ("two_passes_ms", "s--", "grads + weights")):
            pts = [(r["target_weights"] / 1e6, r[key]) for r in rows if r["kernel"] == kind]
            ax.plot(*zip(*pts), style, label=f"{kind}: {label}")
    ax.set_xlabel("target weights (millions)")
    ax.set_ylabel("mask overhead per step (ms)")
    ax.set_title("sparsetrain per-step mask work, CPU")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "scaling_cpu.png", dpi=120)

    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = [
        "# Per-step mask overhead vs target weights (CPU)",
        "",
        f"Machine: {machine}. Command: `python experiments/bench_scaling.py{' --compiled' if args.compiled else ''}`. "
        "One pass = masking the gradients (every step); two passes = also re-applying the masks to the "
        "weights (`reapply='always'` or an optimizer outside the SGD/Adam family). Bool masks, 90 % sparse.",
        "",
        "| kernel | target weights | one pass (ms) | two passes (ms) | ns per weight per pass |",
        "|---|---|---|---|---|",
        *[
            f"| {r['kernel']} | {r['target_weights']:,} | {r['one_pass_ms']:.1f} | {r['two_passes_ms']:.1f} | "
            f"{r['ns_per_weight_per_pass']:.2f} |"
            for r in rows
        ],
        "",
    ]
    (args.out / "scaling_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
