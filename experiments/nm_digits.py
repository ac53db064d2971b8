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

import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import lightning as L
import torch

from common import (
    Rows, command, digits_data, digits_module, footer, markdown_table, mean_std, parser, quiet, quiet_trainer, seeds_of,
)
from sparsetrain import SparsityCallback
from sparsetrain.core.layouts import target_layouts
from sparsetrain.core.nm import NMStructure
from sparsetrain.methods import GMP, SRSTE, Dense, RigL

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
    quiet()
    L.seed_everything(seed, verbose=False)
    data, module = digits_data(seed), digits_module()
    sparsity, structure = SETTINGS.get(setting, (0.0, None))
    sparse = Dense() if method == "dense" else METHODS[method](sparsity, structure)
    callback = SparsityCallback(sparse, seed=seed, log_per_layer=False, dense_first=True)
    trainer = quiet_trainer(epochs, [callback])
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


def table(rows: list[dict], cmd: str, epochs: int) -> str:
    def cell(method, setting):
        return mean_std([r["test_acc"] for r in rows if r["method"] == method and (method == "dense" or r["setting"] == setting)])

    def measured(method, setting):
        got = [r for r in rows if r["method"] == method and r["setting"] == setting]
        if not got:
            return "—"
        text = f"{100 * statistics.mean(r['measured_sparsity'] for r in got):.2f}"
        return text + (" (N:M in every run)" if all(str(r["n_m_holds"]) == "True" for r in got) else "") * (SETTINGS[setting][1] is not None)

    lines = [
        "# N:M vs unstructured sparsity on digits (8x8)",
        "",
        f"Test accuracy (%) of `digits_cnn` after {epochs} epochs, mean ± std over {seeds_of(rows)}; 270 test images, "
        "so one image is 0.37 %. The first conv stays dense in every",
        "run; the other 61,056 weights are pruned uniformly (50 % or 75 % in every layer). Settings: the docstring",
        "of `experiments/nm_digits.py`. The dense row does not depend on the column.",
        "",
        *markdown_table("method", list(SETTINGS), {m: [cell(m, s) for s in SETTINGS] for m in ["dense", *METHODS]}),
        "",
        "Measured sparsity of the prunable weights at the end (%, counted from the tensors; \"N:M\": at most",
        "N non-zeros in every group of M of every target's final weights, in every seed):",
        "",
        *markdown_table("method", list(SETTINGS), {m: [measured(m, s) for s in SETTINGS] for m in METHODS}),
    ]  # fmt: skip
    return "\n".join(lines + footer(rows, cmd))


def main(argv=None) -> None:
    args = parser(__doc__)
    args.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args.add_argument("--methods", nargs="+", default=["dense", *METHODS], choices=["dense", *METHODS])
    args.add_argument("--epochs", type=int, default=20)
    args.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    args = args.parse_args(argv)
    jobs = [(m, s, seed) for m in args.methods for s in (["—"] if m == "dense" else SETTINGS)
            for seed in args.seeds if not (m == "SR-STE" and SETTINGS[s][1] is None)]  # fmt: skip
    line = lambda r: (f"{r['method']:7s} {r['setting']:18s} seed={r['seed']} acc={r['test_acc']:.4f} "  # noqa: E731
                      f"measured={r['measured_sparsity']:.4f} N:M={r['n_m_holds']} ({r['seconds']:.1f} s)")  # fmt: skip
    with Rows(args.out / "nm_digits.csv", FIELDS, line) as rows, ProcessPoolExecutor(args.jobs) as pool:
        for future in [pool.submit(run, m, s, seed, args.epochs, args.threads) for m, s, seed in jobs]:
            rows.add(future.result())
    (args.out / "nm_digits.md").write_text(table(rows.rows, command("nm_digits.py", argv), args.epochs))
    print((args.out / "nm_digits.md").read_text())

if __name__ == "__main__":
    main()
