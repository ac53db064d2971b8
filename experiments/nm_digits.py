"""Unstructured 50 % vs 2:4 vs 1:4 vs unstructured 75 % with GMP, RigL and SR-STE on scikit-learn's digits.

The same small CNN, data, optimizer and length as ``experiments/dst_digits.py`` (``digits_cnn``,
SGD lr 0.1 Nesterov 0.9, wd 5e-4, cosine LR, batch 64, 20 epochs of 20 steps, 270 test images,
``split_seed=0``), at each setting and seed. The first conv (1 x 3 x 3 = 9 inputs per output
channel, not a multiple of 4) stays dense in every run (``dense_first=True``), so every column
prunes the same 61 k weights by the same amount: the columns differ only in the structure.
``distribution="uniform"`` everywhere (an N:M layer is ``1 - N/M`` sparse, so the unstructured
runs get the same per-layer sparsity, and only the position of the zeros differs).

* GMP: magnitude pruning on the cubic schedule over steps 0..0.5 of training, ``every=20``; with a
  structure, unstructured pruning in which every group keeps its ``N`` largest, exactly N:M at the end;
* RigL: random initial mask (N:M: ``N`` random per group), ``every=20``, ``drop_fraction=0.3``
  cosine-decayed to 0 at ``end=0.75``; N:M: regrowth inside the groups dropped from;
* SR-STE: ``decay=2e-4`` (the paper's ``lambda_W``), the mask recomputed after every step, hard at
  the end. SR-STE is defined for N:M only: its unstructured cells are empty.

Writes ``<out>/nm_digits.csv`` (one row per run, as runs finish) and ``<out>/nm_digits.md`` (mean
± std over seeds, and whether every run's final weights are N:M). Usage::

    python experiments/nm_digits.py                    # 55 runs, ~15 min on 2 cores (--jobs 2)
    python experiments/nm_digits.py --seeds 0 --epochs 2 --out /tmp/nm   # smoke test
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import lightning as L
import torch

from sparsetrain import SparsityCallback
from sparsetrain.apps.data import DigitsDataModule
from sparsetrain.apps.models import build_model
from sparsetrain.apps.module import ClassificationModule
from sparsetrain.core.layouts import target_layouts
from sparsetrain.core.nm import NMStructure
from sparsetrain.methods import GMP, SRSTE, Dense, RigL

RESULTS = Path(__file__).parent / "results"
SETTINGS = {  # column: (sparsity, structure)
    "unstructured 50 %": (0.5, None),
    "2:4": (0.5, "2:4"),
    "1:4": (0.75, "1:4"),
    "unstructured 75 %": (0.75, None),
}
METHODS = {
    "GMP": lambda s, nm: GMP(sparsity=s, start=0, end=0.5, every=20, distribution="uniform", structure=nm),
    "RigL": lambda s, nm: RigL(sparsity=s, distribution="uniform", every=20, drop_fraction=0.3, end=0.75, structure=nm),
    "SR-STE": lambda s, nm: SRSTE(nm, decay=2e-4),
}
FIELDS = ["method", "setting", "seed", "test_acc", "measured_sparsity", "n_m_holds", "seconds"]


def run(method: str, setting: str, seed: int, epochs: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    L.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=64, seed=seed, split_seed=0)
    net = build_model("digits_cnn", num_classes=10, in_chans=1, img_size=8)
    module = ClassificationModule(net, num_classes=10, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True,
                                  weight_decay=5e-4, lr_schedule="cosine")
    sparsity, structure = SETTINGS.get(setting, (0.0, None))
    sparse = Dense() if method == "dense" else METHODS[method](sparsity, structure)
    callback = SparsityCallback(sparse, seed=seed, log_per_layer=False, dense_first=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[callback])
    start = time.perf_counter()
    trainer.fit(module, data)
    acc = trainer.test(module, data, verbose=False)[0]["test/acc"]
    nm = NMStructure.parse(structure)
    layouts = target_layouts(module, callback.targets)  # groups along each target's input dim, as the method's
    holds = "" if nm is None else all(  # counted from the weights: at most N non-zeros in every group
        bool((nm.on(layouts[n].grouping(tuple(p.shape))).group_counts(p != 0) <= nm.n).all())
        for n, p in callback.targets.items() if layouts[n].grouping(tuple(p.shape)).fits(nm.m)
    )
    return {"method": method, "setting": setting, "seed": seed, "test_acc": round(float(acc), 6),
            "measured_sparsity": round(callback.sparsity_report().global_sparsity, 6), "n_m_holds": holds,
            "seconds": round(time.perf_counter() - start, 2)}


def table(rows: list[dict], command: str, epochs: int) -> str:
    def cell(method, setting):
        accs = [r["test_acc"] for r in rows if r["method"] == method and (method == "dense" or r["setting"] == setting)]
        if not accs:
            return "—"
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        return f"{100 * statistics.mean(accs):.2f} ± {100 * std:.2f}"

    def measured(method, setting):
        got = [r for r in rows if r["method"] == method and r["setting"] == setting]
        if not got:
            return "—"
        text = f"{100 * statistics.mean(r['measured_sparsity'] for r in got):.2f}"
        return text + (" (N:M in every run)" if all(str(r["n_m_holds"]) == "True" for r in got) else "") * (SETTINGS[setting][1] is not None)

    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# N:M vs unstructured sparsity on digits (8x8)",
        "",
        f"Test accuracy (%) of `digits_cnn` after {epochs} epochs, mean ± std over {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}); 270 test images, so one image is 0.37 %. The first conv stays dense in every",
        "run; the other 61,056 weights are pruned uniformly (50 % or 75 % in every layer). Settings: the docstring",
        "of `experiments/nm_digits.py`. The dense row does not depend on the column.",
        "",
        "| method | " + " | ".join(SETTINGS) + " |",
        "|---|" + "---|" * len(SETTINGS),
        "| dense | " + " | ".join(cell("dense", s) for s in SETTINGS) + " |",
    ]
    for method in METHODS:
        lines.append(f"| {method} | " + " | ".join(cell(method, s) for s in SETTINGS) + " |")
    lines += ["", "Measured sparsity of the prunable weights at the end (%, counted from the tensors; \"N:M\": at most",
              "N non-zeros in every group of M of every target's final weights, in every seed):", "",
              "| method | " + " | ".join(SETTINGS) + " |", "|---|" + "---|" * len(SETTINGS)]
    for method in METHODS:
        lines.append(f"| {method} | " + " | ".join(measured(method, s) for s in SETTINGS) + " |")
    total = sum(r["seconds"] for r in rows)
    lines += ["", f"{len(rows)} runs, {total / 60:.1f} min of training and testing in total.", "",
              "Command:", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=["dense", *METHODS], choices=["dense", *METHODS])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: experiments/results)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/nm_digits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    jobs = [(m, s, seed) for m in args.methods for s in (["—"] if m == "dense" else SETTINGS)
            for seed in args.seeds if not (m == "SR-STE" and SETTINGS[s][1] is None)]
    rows: list[dict] = []
    with open(args.out / "nm_digits.csv", "w", newline="") as f, ProcessPoolExecutor(args.jobs) as pool:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        futures = [pool.submit(run, m, s, seed, args.epochs, args.threads) for m, s, seed in jobs]
        for future in futures:
            row = future.result()
            rows.append(row)
            writer.writerow(row)
            f.flush()
            print(f"{row['method']:7s} {row['setting']:18s} seed={row['seed']} acc={row['test_acc']:.4f} "
                  f"measured={row['measured_sparsity']:.4f} N:M={row['n_m_holds']} ({row['seconds']:.1f} s)", flush=True)
    (args.out / "nm_digits.md").write_text(table(rows, command.strip(), args.epochs))
    print((args.out / "nm_digits.md").read_text())


if __name__ == "__main__":
    main()
