"""Dense vs static vs SET vs RigL vs GraNet vs GMP on scikit-learn's 8x8 digits.

A small CNN (``digits_cnn``: four 3x3 conv-BN-ReLU layers, 65 k prunable weights) trained with
SGD (lr 0.1, Nesterov momentum 0.9, weight decay 5e-4, cosine LR), batch 64, for ``--epochs``
epochs (20 steps each), at each sparsity and seed; test accuracy on the fixed 270-image test
split (``split_seed=0``; the seed changes the initialisation, the masks and the data order).
Writes ``<out>/dst_digits.csv`` (one row per run, written as runs finish) and
``<out>/dst_digits.md`` (mean ± std over seeds); ``<out>`` = ``--out`` (default experiments/results/).

Method settings (``every`` = 20 steps = one epoch):

* static: ERK random masks, never updated;
* SET / RigL: ERK, ``every=20``, ``drop_fraction=0.3`` cosine-decayed to 0 at ``end=0.75``;
* GraNet: dense start, global magnitude pruning on the cubic schedule over steps 0..0.5 of
  training, regrowth fraction 0.5 cosine-decayed to 0 at the end of training, ``every=20``;
* GMP: the same cubic schedule and global magnitude pruning as GraNet, without regrowth.

Usage::

    python experiments/dst_digits.py                   # full run: 80 runs, ~20 min on 2 busy cores
    python experiments/dst_digits.py --seeds 0 --epochs 3 --out /tmp/dst   # smoke test
"""

from __future__ import annotations

import time

import lightning as L
import torch

from common import (
    Rows, command, digits_data, digits_module, footer, markdown_table, mean_std, parser, quiet, quiet_trainer, seeds_of,
)
from sparsetrain import SparsityCallback
from sparsetrain.methods import GMP, SET, Dense, GraNet, RigL, Static

METHODS = {
    "dense": lambda s: Dense(),
    "static": lambda s: Static(sparsity=s, distribution="erk"),
    "SET": lambda s: SET(sparsity=s, distribution="erk", every=20, drop_fraction=0.3, end=0.75),
    "RigL": lambda s: RigL(sparsity=s, distribution="erk", every=20, drop_fraction=0.3, end=0.75),
    "GraNet": lambda s: GraNet(sparsity=s, initial_density=1.0, start=0, end=0.5, every=20, regrowth_fraction=0.5),
    "GMP": lambda s: GMP(sparsity=s, start=0, end=0.5, every=20, distribution="global"),
}
FIELDS = ["method", "sparsity", "seed", "test_acc", "measured_sparsity", "seconds"]


def run(method: str, sparsity: float, seed: int, epochs: int) -> dict:
    L.seed_everything(seed, verbose=False)
    data, module = digits_data(seed), digits_module()
    callback = SparsityCallback(METHODS[method](sparsity), seed=seed, log_per_layer=False)
    trainer = quiet_trainer(epochs, [callback])
    start = time.perf_counter()
    trainer.fit(module, data)
    acc = trainer.test(module, data, verbose=False)[0]["test/acc"]
    return {"method": method, "sparsity": sparsity if method != "dense" else 0.0, "seed": seed,
            "test_acc": round(float(acc), 6), "measured_sparsity": round(callback.sparsity_report().global_sparsity, 6),
            "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


def table(rows: list[dict], sparsities: list[float], cmd: str, epochs: int) -> str:
    def cell(method, s):
        return mean_std([r["test_acc"] for r in rows if r["method"] == method and (method == "dense" or r["sparsity"] == s)])

    def measured(method, s):
        vals = [r["measured_sparsity"] for r in rows if r["method"] == method and r["sparsity"] == s]
        return f"{100 * sum(vals) / len(vals):.2f}" if vals else "—"

    header = [f"{100 * s:g} % sparse" for s in sparsities]
    lines = [
        "# Dynamic sparse training on digits (8x8)",
        "",
        f"Test accuracy (%) of `digits_cnn` (65,440 prunable weights) after {epochs} epochs, mean ± std over "
        f"{seeds_of(rows)}; 270 test images, so one image is 0.37 %.",
        "Method settings are in the docstring of `experiments/dst_digits.py`. The dense row does not depend on",
        "the sparsity column.",
        "",
        *markdown_table("method", header, {m: [cell(m, s) for s in sparsities] for m in METHODS}),
        "",
        "Measured global sparsity of the prunable weights at the end (%, counted from the tensors):",
        "",
        *markdown_table("method", [f"{100 * s:g} %" for s in sparsities],
                        {m: [measured(m, s) for s in sparsities] for m in METHODS if m != "dense"}),
    ]  # fmt: skip
    return "\n".join(lines + footer(rows, cmd))


def main(argv=None) -> None:
    args = parser(__doc__)
    args.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    args.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args.add_argument("--epochs", type=int, default=20)
    args = args.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    line = lambda r: (f"{r['method']:7s} s={r['sparsity']:.2f} seed={r['seed']} acc={r['test_acc']:.4f} "  # noqa: E731
                      f"measured={r['measured_sparsity']:.4f} ({r['seconds']:.1f} s)")  # fmt: skip
    with Rows(args.out / "dst_digits.csv", FIELDS, line) as rows:
        for method in args.methods:
            for sparsity in [0.0] if method == "dense" else args.sparsities:
                for seed in args.seeds:
                    rows.add(run(method, sparsity, seed, args.epochs))
    (args.out / "dst_digits.md").write_text(table(rows.rows, args.sparsities, command("dst_digits.py", argv), args.epochs))
    print((args.out / "dst_digits.md").read_text())


if __name__ == "__main__":
    main()
