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

import argparse
import csv
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from sparsetrain import SparsityCallback
from sparsetrain.apps.data import DigitsDataModule
from sparsetrain.apps.models import build_model
from sparsetrain.apps.module import ClassificationModule
from sparsetrain.methods import GMP, SET, Dense, GraNet, RigL, Static

RESULTS = Path(__file__).parent / "results"
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
    data = DigitsDataModule(batch_size=64, seed=seed, split_seed=0)
    net = build_model("digits_cnn", num_classes=10, in_chans=1, img_size=8)
    module = ClassificationModule(net, num_classes=10, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True,
                                  weight_decay=5e-4, lr_schedule="cosine")
    callback = SparsityCallback(METHODS[method](sparsity), seed=seed, log_per_layer=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[callback])
    start = time.perf_counter()
    trainer.fit(module, data)
    acc = trainer.test(module, data, verbose=False)[0]["test/acc"]
    return {"method": method, "sparsity": sparsity if method != "dense" else 0.0, "seed": seed,
            "test_acc": round(float(acc), 6), "measured_sparsity": round(callback.sparsity_report().global_sparsity, 6),
            "seconds": round(time.perf_counter() - start, 2)}


def table(rows: list[dict], sparsities: list[float], command: str, epochs: int) -> str:
    def cell(method, s):
        accs = [r["test_acc"] for r in rows if r["method"] == method and (method == "dense" or r["sparsity"] == s)]
        if not accs:
            return "—"
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        return f"{100 * statistics.mean(accs):.2f} ± {100 * std:.2f}"

    def measured(method, s):
        vals = [r["measured_sparsity"] for r in rows if r["method"] == method and r["sparsity"] == s]
        return f"{100 * statistics.mean(vals):.2f}" if vals else "—"

    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# Dynamic sparse training on digits (8x8)",
        "",
        f"Test accuracy (%) of `digits_cnn` (65,440 prunable weights) after {epochs} epochs, mean ± std over "
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); 270 test images, so one image is 0.37 %.",
        "Method settings are in the docstring of `experiments/dst_digits.py`. The dense row does not depend on",
        "the sparsity column.",
        "",
        "| method | " + " | ".join(f"{100 * s:g} % sparse" for s in sparsities) + " |",
        "|---|" + "---|" * len(sparsities),
    ]
    for method in METHODS:
        lines.append(f"| {method} | " + " | ".join(cell(method, s) for s in sparsities) + " |")
    lines += ["", "Measured global sparsity of the prunable weights at the end (%, counted from the tensors):", "",
              "| method | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " |",
              "|---|" + "---|" * len(sparsities)]
    for method in [m for m in METHODS if m != "dense"]:
        lines.append(f"| {method} | " + " | ".join(measured(method, s) for s in sparsities) + " |")
    total = sum(r["seconds"] for r in rows)
    lines += ["", f"{len(rows)} runs, {total / 60:.1f} min of training and testing in total.", "",
              "Command:", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for this net)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: experiments/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/dst_digits.py " + " ".join(sys.argv[1:] if argv is None else argv)

    rows: list[dict] = []
    with open(args.out / "dst_digits.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for method in args.methods:
            for sparsity in [0.0] if method == "dense" else args.sparsities:
                for seed in args.seeds:
                    row = run(method, sparsity, seed, args.epochs)
                    rows.append(row)
                    writer.writerow(row)
                    f.flush()
                    print(f"{method:7s} s={sparsity:.2f} seed={seed} acc={row['test_acc']:.4f} "
                          f"measured={row['measured_sparsity']:.4f} ({row['seconds']:.1f} s)", flush=True)
    (args.out / "dst_digits.md").write_text(table(rows, args.sparsities, command.strip(), args.epochs))
    print((args.out / "dst_digits.md").read_text())


if __name__ == "__main__":
    main()
