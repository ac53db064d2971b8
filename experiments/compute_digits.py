"""Sparse kernels in a real training run: the same accuracy as the masked path, on digits (8x8).

LeNet-300-100 (64-300-100-10, every layer a Linear, 50,200 prunable weights) on scikit-learn's digits,
trained with ``SparsityCallback(..., compute=...)`` for ``masked`` (dense kernels on weights with zeros),
``auto`` (each layer on whichever kernel measured faster at its first forward) and ``sparse`` (every layer on
the CSR kernels). Methods: RigL (ERK, every 20 steps, drop fraction 0.3, end 0.75) and GMP (global, start 0,
end 0.5, every 20) at 95 %; SGD lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4, cosine, batch 64, 20 epochs.
Reported: test accuracy (mean ± std over seeds), whether the final masks equal the masked run's (same seed),
and the training time of the fit over the masked run's. A small model on one core: the time column says
what the switch costs or saves here, not what it gives a 4096-wide layer (experiments/bench_sparse_compute.py).

    python experiments/compute_digits.py                       # 3 seeds x 2 methods x 3 modes, ~5 min
"""

from __future__ import annotations

import time

import lightning as L
import torch

from common import Rows, command, digits_data, footer, markdown_table, mean_std, parser, quiet, quiet_trainer, seeds_of
from sparsetrain import SparsityCallback
from sparsetrain.apps.models import build_model
from sparsetrain.apps.module import ClassificationModule
from sparsetrain.methods import GMP, RigL

METHODS = {
    "RigL 95 %": lambda: RigL(sparsity=0.95, distribution="erk", every=20, drop_fraction=0.3, end=0.75),
    "GMP 95 %": lambda: GMP(sparsity=0.95, start=0, end=0.5, every=20, distribution="global"),
}
MODES = ("masked", "auto", "sparse")
FIELDS = ["method", "compute", "seed", "test_acc", "measured_sparsity", "fit_seconds", "same_masks"]


def run(method: str, compute: str, seed: int, epochs: int) -> tuple[dict, dict]:
    L.seed_everything(seed, verbose=False)
    net = build_model("lenet300_100", num_classes=10, in_chans=1, img_size=8)
    module = ClassificationModule(net, num_classes=10, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True,
                                  weight_decay=5e-4, lr_schedule="cosine")  # fmt: skip
    callback = SparsityCallback(METHODS[method](), seed=seed, log_per_layer=False, compute=compute)
    trainer, data = quiet_trainer(epochs, [callback]), digits_data(seed)
    start = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - start
    acc = trainer.test(module, data, verbose=False)[0]["test/acc"]
    masks = {n: m.cpu().clone() for n, m in callback.masks.items()}
    return {"method": method, "compute": compute, "seed": seed, "test_acc": round(float(acc), 6),
            "measured_sparsity": round(callback.sparsity_report().global_sparsity, 6),
            "fit_seconds": round(seconds, 2)}, masks  # fmt: skip


def table(rows: list[dict], cmd: str, epochs: int) -> str:
    def cell(method, compute):
        return mean_std([r["test_acc"] for r in rows if r["method"] == method and r["compute"] == compute])

    def same(method, compute):
        got = [r["same_masks"] for r in rows if r["method"] == method and r["compute"] == compute]
        return f"{sum(got)}/{len(got)}" if got else "—"

    def time_ratio(method, compute):
        base = {r["seed"]: r["fit_seconds"] for r in rows if r["method"] == method and r["compute"] == "masked"}
        mine = [r["fit_seconds"] / base[r["seed"]] for r in rows if r["method"] == method and r["compute"] == compute and r["seed"] in base]
        return f"{sum(mine) / len(mine):.2f}x" if mine else "—"

    lines = [
        "# Sparse kernels in training: LeNet-300-100 on digits (8x8)",
        "",
        f"Test accuracy (%) after {epochs} epochs, mean ± std over {seeds_of(rows)}; 270 test images (one image is 0.37 %).",
        "Settings: the docstring of `experiments/compute_digits.py`.",
        "",
        *markdown_table("method", [f"compute={c}" for c in MODES], {m: [cell(m, c) for c in MODES] for m in METHODS}),
        "",
        "Final masks equal to the masked run's with the same seed (runs), and fit time over the masked run's (mean):",
        "",
        *markdown_table("method", [f"{c}: same masks, time" for c in MODES],
                        {m: [f"{same(m, c)}, {time_ratio(m, c)}" for c in MODES] for m in METHODS}),
    ]  # fmt: skip
    return "\n".join(lines + footer([{**r, "seconds": r["fit_seconds"]} for r in rows], cmd))


def main(argv=None) -> None:
    args = parser(__doc__)
    args.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args.add_argument("--epochs", type=int, default=20)
    args = args.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    line = lambda r: (f"{r['method']:10s} {r['compute']:7s} seed={r['seed']} acc={r['test_acc']:.4f} "  # noqa: E731
                      f"same masks={r['same_masks']} ({r['fit_seconds']:.1f} s)")  # fmt: skip
    with Rows(args.out / "compute_digits.csv", FIELDS, line) as rows:
        for method in METHODS:
            for seed in args.seeds:
                reference = None
                for compute in MODES:
                    row, masks = run(method, compute, seed, args.epochs)
                    reference = masks if compute == "masked" else reference
                    rows.add({**row, "same_masks": all(torch.equal(masks[n], reference[n]) for n in reference)})
    (args.out / "compute_digits.md").write_text(table(rows.rows, command("compute_digits.py", argv), args.epochs))
    print((args.out / "compute_digits.md").read_text())


if __name__ == "__main__":
    main()
