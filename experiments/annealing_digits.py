"""One-shot magnitude pruning + fine-tuning vs stochastic subnetwork annealing on 8x8 digits.

For every seed a ``digits_cnn`` (four 3x3 conv-BN-ReLU layers, 65,440 prunable weights) is
trained dense for ``--dense-epochs`` epochs (SGD lr 0.1, Nesterov momentum 0.9, weight decay
5e-4, cosine LR, batch 64, 20 steps per epoch). From those weights, at each sparsity, every
variant below fine-tunes for ``--ft-epochs`` epochs with the same recipe at lr ``--ft-lr``
(cosine to 0), and is tested on the fixed 270-image test split (``split_seed=0``; the seed
changes initialisation, data order and sampling). All targets are chosen by global magnitude
of the dense weights (one threshold over all layers).

* ``pruned, no FT``: the dense network with the target mask applied, not fine-tuned
  (BatchNorm statistics of the dense network);
* ``one-shot + FT``: ``GMP`` with ``initial_sparsity = sparsity``, ``start = end = 0``: prune
  at fit start, fine-tune the static sparse network;
* ``gradual (GMP) + FT``: ``GMP`` cubic schedule from 0 to ``sparsity`` over the first half
  of fine-tuning, an update every epoch (a deterministic gradual baseline with the same
  window as annealing);
* ``annealing (τ0=0.5, linear)``: ``StochasticAnnealing`` with the same target, every
  excluded weight included with probability ``0.5 * (1 - t / end)``, ``end`` = half of
  fine-tuning, hard masks after;
* ``annealing (random ≤1, cosine)``: per-weight probabilities ``b_i ~ U[0, 1)`` (mean 0.5),
  cosine curve, same ``end``.

Writes ``<out>/<name>.csv`` (one row per run, as runs finish) and ``<out>/<name>.md`` (mean ± std over
seeds), ``<name>`` = ``--name`` (default annealing_digits), ``<out>`` = ``--out`` (default experiments/results/).

Usage::

    python experiments/annealing_digits.py                  # 2 sparsities x 5 seeds, ~6 min on 2 cores
    python experiments/annealing_digits.py --seeds 0 --dense-epochs 3 --ft-epochs 2 --out /tmp/ssa   # smoke test
    python experiments/annealing_digits.py --sparsities 0.98 --name annealing_digits_ablation \
        --variants "one-shot + FT" "annealing (τ0=0.5, linear)" "annealing (τ0=0.5, linear, end 0.25)" \
        "annealing (τ0=0.1, linear)" "annealing (τ0=0.5, exponential)"                # ablation at 98 %
"""

from __future__ import annotations

import statistics
import time

import lightning as L
import torch

from common import (
    Rows, command, digits_data, digits_module, footer, markdown_table, mean_std, parser, quiet, quiet_trainer, seeds_of,
)
from sparsetrain import SparsityCallback
from sparsetrain.core import budget_masks, magnitude_scores, select_targets
from sparsetrain.methods import GMP, Dense, StochasticAnnealing

VARIANTS = {
    "one-shot + FT": lambda s: GMP(sparsity=s, initial_sparsity=s, start=0, end=0, every=1, distribution="global"),
    "gradual (GMP) + FT": lambda s: GMP(sparsity=s, start=0, end=0.5, every=20, distribution="global"),
    "annealing (τ0=0.5, linear)": lambda s: StochasticAnnealing(
        s, distribution="global", initial_probability=0.5, schedule="linear", end=0.5
    ),
    "annealing (random ≤1, cosine)": lambda s: StochasticAnnealing(
        s, distribution="global", initial_probability=1.0, probabilities="random", schedule="cosine", end=0.5
    ),
}
# more variants for ablations (--variants); not in the default run
EXTRA = {
    "annealing (τ0=0.5, linear, end 0.25)": lambda s: StochasticAnnealing(
        s, distribution="global", initial_probability=0.5, schedule="linear", end=0.25
    ),
    "annealing (τ0=0.1, linear)": lambda s: StochasticAnnealing(
        s, distribution="global", initial_probability=0.1, schedule="linear", end=0.5
    ),
    "annealing (τ0=0.5, exponential)": lambda s: StochasticAnnealing(
        s, distribution="global", initial_probability=0.5, schedule="exponential", end=0.5
    ),
}
NO_FT = "pruned, no FT"
FIELDS = ["variant", "sparsity", "seed", "test_acc", "measured_sparsity", "seconds"]


def fit_and_test(module, method, seed: int, epochs: int) -> tuple[float, float]:
    data = digits_data(seed)
    callback = SparsityCallback(method, seed=seed, log_per_layer=False)
    trainer = quiet_trainer(epochs, [callback])
    if epochs > 0:
        trainer.fit(module, data)
    acc = trainer.test(module, data, verbose=False)[0]["test/acc"]
    report = callback.sparsity_report() if callback.targets else None
    return float(acc), report.global_sparsity if report else 0.0


def test_only(module, seed: int) -> float:
    return float(quiet_trainer(0, []).test(module, digits_data(seed), verbose=False)[0]["test/acc"])


def table(rows: list[dict], sparsities: list[float], cmd: str, args, chosen: dict) -> str:
    def cell(variant, s):
        return mean_std([r["test_acc"] for r in rows if r["variant"] == variant and r["sparsity"] == s])

    def wins(variant, s):
        base = {r["seed"]: r["test_acc"] for r in rows if r["variant"] == "one-shot + FT" and r["sparsity"] == s}
        mine = {r["seed"]: r["test_acc"] for r in rows if r["variant"] == variant and r["sparsity"] == s}
        common = sorted(set(base) & set(mine))
        diff = [mine[k] - base[k] for k in common]
        if not diff:
            return "—"
        better = sum(d > 0 for d in diff)
        worse = sum(d < 0 for d in diff)
        return f"{100 * statistics.mean(diff):+.2f} ({better}/{worse})"

    dense = [r["test_acc"] for r in rows if r["variant"] == "dense"]
    variants = [NO_FT, *chosen]
    lines = [
        "# Stochastic subnetwork annealing on digits (8x8)",
        "",
        f"Test accuracy (%) of `digits_cnn` (65,440 prunable weights), mean ± std over {seeds_of(rows)}; "
        "270 test images, so one image is 0.37 %. Dense network: "
        f"{args.dense_epochs} epochs, {mean_std(dense)} %. Every fine-tuning run: "
        f"{args.ft_epochs} epochs from the dense weights, SGD lr {args.ft_lr} (cosine), targets by global magnitude; "
        "annealing ends (hard masks) at half of fine-tuning. Variants: docstring of `experiments/annealing_digits.py`.",
        "",
        *markdown_table("variant", [f"{100 * s:g} % sparse" for s in sparsities],
                        {v: [cell(v, s) for s in sparsities] for v in variants}),
        "",
        "Difference to one-shot + FT, same seed (percentage points, mean; seeds better/worse):",
        "",
        *markdown_table("variant", [f"{100 * s:g} %" for s in sparsities],
                        {v: [wins(v, s) for s in sparsities] for v in chosen if v != "one-shot + FT"}),
    ]  # fmt: skip
    measured = {s: [r["measured_sparsity"] for r in rows if r["sparsity"] == s and r["variant"] in chosen]
                for s in sparsities}
    lines += ["", "Measured sparsity of the prunable weights after fine-tuning (counted from the tensors): "
              + ", ".join(f"{100 * min(v):.2f}–{100 * max(v):.2f} % at {100 * s:g} %" for s, v in measured.items() if v)
              + "."]
    return "\n".join(lines + footer(rows, cmd))


def main(argv=None) -> None:
    args = parser(__doc__)
    args.add_argument("--sparsities", type=float, nargs="+", default=[0.95, 0.98])
    args.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args.add_argument("--dense-epochs", type=int, default=30)
    args.add_argument("--ft-epochs", type=int, default=20)
    args.add_argument("--ft-lr", type=float, default=0.02)
    args.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=[*VARIANTS, *EXTRA],
                      help="fine-tuning variants ('one-shot + FT' is the reference of the difference table)")
    args.add_argument("--name", default="annealing_digits", help="file name of the results (.csv, .md)")
    args = args.parse_args(argv)
    chosen = {v: {**VARIANTS, **EXTRA}[v] for v in args.variants}
    torch.set_num_threads(args.threads)
    quiet()
    line = lambda r: (f"{r['variant']:30s} s={r['sparsity']:.2f} seed={r['seed']} acc={r['test_acc']:.4f} "  # noqa: E731
                      f"measured={r['measured_sparsity']:.4f} ({r['seconds']:.1f} s)")  # fmt: skip
    with Rows(args.out / f"{args.name}.csv", FIELDS, line) as rows:
        record = rows.add
        for seed in args.seeds:
            start = time.perf_counter()
            L.seed_everything(seed, verbose=False)
            dense = digits_module(lr=0.1)
            acc, _ = fit_and_test(dense, Dense(), seed, args.dense_epochs)
            record({"variant": "dense", "sparsity": 0.0, "seed": seed, "test_acc": round(acc, 6),
                    "measured_sparsity": 0.0, "seconds": round(time.perf_counter() - start, 2)})
            weights = {k: v.clone() for k, v in dense.state_dict().items()}
            for sparsity in args.sparsities:
                start = time.perf_counter()  # the target alone, no fine-tuning
                module = digits_module(args.ft_lr)
                module.load_state_dict(weights)
                targets = select_targets(module)
                masks = budget_masks(magnitude_scores(targets), sparsity, "global")
                with torch.no_grad():
                    for n, p in targets.items():
                        p.mul_(masks[n])
                record({"variant": NO_FT, "sparsity": sparsity, "seed": seed, "test_acc": round(test_only(module, seed), 6),
                        "measured_sparsity": round(1 - sum(int(m.sum()) for m in masks.values())
                                                   / sum(m.numel() for m in masks.values()), 6),
                        "seconds": round(time.perf_counter() - start, 2)})
                for variant, make in chosen.items():
                    start = time.perf_counter()
                    L.seed_everything(seed, verbose=False)
                    module = digits_module(args.ft_lr)
                    module.load_state_dict(weights)
                    acc, measured = fit_and_test(module, make(sparsity), seed, args.ft_epochs)
                    record({"variant": variant, "sparsity": sparsity, "seed": seed, "test_acc": round(acc, 6),
                            "measured_sparsity": round(measured, 6), "seconds": round(time.perf_counter() - start, 2)})
    cmd = command("annealing_digits.py", argv)
    (args.out / f"{args.name}.md").write_text(table(rows.rows, args.sparsities, cmd, args, chosen))
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
