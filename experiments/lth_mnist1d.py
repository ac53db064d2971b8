"""Lottery tickets on MNIST-1D, next to the published figures of the MNIST-1D paper's notebook.

For every seed: ``sparsetrain-lottery experiment=lth_mlp_mnist1d seed=S`` (the 40-500-500-10 residual MLP,
layer-wise IMP with rewinding to initialisation, 18 levels of p = 0.2 down to 1.8 % density, Adam lr 2e-2,
batch 100, 1,500 steps per level, test accuracy of the final weights), then its two controls,
``lottery.control=reinit`` (each level's masks from a fresh init) and ``lottery.control=random_mask``
(random masks with each level's per-layer counts, from the same init: the notebook's "random" tickets).
The main runs go first, two at a time (``--jobs``), then the controls. Mean and std over seeds go to
``<out>/lth_mnist1d.{csv,md,png}`` (default experiments/results/; ``--out DIR``).

    python experiments/lth_mnist1d.py                        # 3 seeds, ~25 min on 2 CPU cores
    python experiments/lth_mnist1d.py --seeds 0 --levels 3   # a quick look

Runs live in ``outputs/lottery/lth_mlp_mnist1d/`` and resume where they stopped.
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = {"weight": "tickets (rewind to init)", "reinit": "reinit control", "random_mask": "random-mask control"}
# greydanus/mnist1d notebooks/lottery-tickets.ipynb, printed output of its two trials: last_acc (%) of the
# final weights at each sparsity (layer-wise magnitude pruning, biases pruned too), "Magnitude pruning" and
# "Random pruning" (random masks from the same init); sparsity 0 is the dense network
PUBLISHED = {  # sparsity: ((tickets, trial 0, trial 1), (random masks, trial 0, trial 1))
    0.0: ((66.4, 64.8), (60.6, 61.4)),
    0.49: ((68.6, 69.1), (63.6, 62.1)),
    0.67: ((68.6, 70.1), (65.3, 65.8)),
    0.80: ((72.9, 72.1), (68.6, 66.3)),
    0.90: ((74.3, 74.1), (60.5, 65.7)),
    0.95: ((69.2, 70.5), (55.9, 54.6)),
    0.98: ((63.0, 63.8), (34.6, 27.2)),
}


def run(seed: int, control: str, levels: int, data_root: str) -> list[dict]:
    import torch
    from hydra import compose, initialize_config_dir

    from sparsetrain.apps.lottery import lottery_from_config
    from sparsetrain.apps.train import config_dir

    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    overrides = ["experiment=lth_mlp_mnist1d", f"seed={seed}", f"lottery.levels={levels}", f"lottery.control={control}",
                 f"data.root={data_root}", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("lottery", overrides=overrides)
    return [{**r, "seed": seed} for r in lottery_from_config(cfg).run()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--levels", type=int, default=18)
    parser.add_argument("--jobs", type=int, default=2, help="lottery runs in parallel (processes, one thread each)")
    parser.add_argument("--data-root", default="data", help="data.root: where the MNIST-1D cache lives")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: experiments/results)")
    args = parser.parse_args(argv)
    from sparsetrain.apps.data import MNIST1DDataModule

    MNIST1DDataModule(root=args.data_root).prepare_data()  # generate the cache once, before the workers start
    started, rows = time.perf_counter(), []
    with ProcessPoolExecutor(args.jobs) as pool:
        for controls in (["none"], ["reinit", "random_mask"]):  # the controls need the main run's masks
            jobs = [(seed, control) for seed in args.seeds for control in controls]
            n = len(jobs)
            for (seed, control), result in zip(jobs, pool.map(run, *zip(*jobs), [args.levels] * n, [args.data_root] * n)):
                rows += result
                print(f"seed {seed} {control}: done at {time.perf_counter() - started:.0f} s", flush=True)
    minutes = (sum(r["wall_time_s"] for r in rows) / 60, (time.perf_counter() - started) / 60)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "lth_mnist1d.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["run", "seed", "level", "density", "test_acc", "steps", "wall_time_s"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "lth_mnist1d.md").write_text(markdown(rows, args, minutes))
    from sparsetrain.plot import accuracy_vs_density

    accuracy_vs_density(rows, args.out / "lth_mnist1d.png",
                        title="MNIST-1D MLP: layer-wise IMP, rewind to init (mean ± std over seeds)")
    print((args.out / "lth_mnist1d.md").read_text())


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def accuracies(rows: list[dict]) -> dict:
    """``{(run, level): [test_acc per seed]}`` and ``{level: density}``."""
    table: dict = {}
    for r in rows:
        table.setdefault((r["run"], r["level"]), []).append(r["test_acc"])
    return table


def markdown(rows: list[dict], args, minutes: tuple[float, float]) -> str:
    table = accuracies(rows)
    density = {r["level"]: r["density"] for r in rows if r["run"] == "weight"}
    dense = table[("weight", 0)]
    lines = [
        "# Lottery tickets on MNIST-1D: tickets vs reinit vs random masks",
        "",
        (
            "The 40-500-500-10 residual MLP of the MNIST-1D paper's lottery-ticket notebook, `experiment=lth_mlp_mnist1d`: "
            "layer-wise IMP with p = 0.2 per level, rewinding to initialisation, Adam lr 2e-2, batch 100, 1,500 steps per "
            "level, all 4,000 training signals. Test accuracy (%) of the final weights on the 1,000 test signals, mean ± "
            f"std over seeds {', '.join(map(str, args.seeds))}. Controls: `reinit` trains each level's masks from a fresh "
            "init (seed + 10000), `random_mask` draws random masks with the same per-layer counts and trains them from "
            "the tickets' init."
        ),
        "",
        "| level | sparsity | tickets | reinit | random masks |",
        "|---:|---:|---:|---:|---:|",
    ]
    for level in sorted(density):
        cells = [_ms(table[(run, level)]) if (run, level) in table else "" for run in RUNS]
        lines.append(f"| {level} | {100 * (1 - density[level]):.1f} % | " + " | ".join(cells) + " |")
    lines += ["", ("Next to the published figures (the notebook's two trials, final accuracy; its masks prune the "
                   "biases too, its levels step the sparsity linearly by 1 %): our level closest to each published sparsity."),
              "", "| sparsity: published / ours | published tickets | ours | published random masks | ours |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for sparsity, (tickets, random_masks) in PUBLISHED.items():
        level = min(density, key=lambda lv: abs(1 - density[lv] - sparsity))
        ours_random = _ms(table[("random_mask", level)]) if level and ("random_mask", level) in table else _ms(dense)
        lines.append(f"| {100 * sparsity:g} % / {100 * (1 - density[level]):.1f} % | {statistics.mean(tickets):.1f} "
                     f"({tickets[0]}, {tickets[1]}) | {_ms(table[('weight', level)])} | {statistics.mean(random_masks):.1f} "
                     f"({random_masks[0]}, {random_masks[1]}) | {ours_random} |")  # fmt: skip
    lines += ["", "![accuracy vs density](lth_mnist1d.png)", "",
              (f"Made by `{' '.join(['python experiments/lth_mnist1d.py', *sys.argv[1:]])}` on 2 shared CPU cores: "
               f"{minutes[0]:.1f} min of training summed over all levels ({minutes[1]:.1f} min for this invocation; "
               "finished levels are read back, not retrained)."), ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
