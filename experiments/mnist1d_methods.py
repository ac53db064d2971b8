"""Every sparse-training method on MNIST-1D, both of the paper's models, 80-98 % sparse, 5 seeds.

Each run is ``sparsetrain-train`` with the model's recipe preset and one method (the overrides are
in :data:`RECOMMENDED`; ``--settings defaults`` uses the configs' defaults instead, as a new user
would), composed and trained in this process; ``--jobs`` runs in parallel, one thread each:

* ``experiment=mnist1d_mlp``: 40-500-500-10 residual MLP (275,000 weights), Adam lr 2e-2, batch 100,
  1,500 steps, constant LR (the lottery-ticket notebook's recipe);
* ``experiment=mnist1d_cnn``: the paper's 1-D CNN (5,125 weights), Adam lr 1e-2, batch 100, 4,000
  steps, constant LR (the paper's benchmark recipe, which trains 6,000 steps on a plateau from 4,000).

Both train on all 4,000 training signals (``data.val_size=0``, no validation during training) and
report the test accuracy of the final weights on the package's 1,000 test signals; the seed changes
the initialisation, the masks and the data order, never the data.

Every run is a ``sparsetrain-train`` output folder (``summary.json``, ``layer_density.png``) in
``<runs>/<model>/<method overrides>/s<sparsity>/seed<k>/`` (``--runs``, default ``outputs/mnist1d_methods``;
e.g. ``mlp/gmp,distribution=erk/s0.95/seed0``): a run whose summary exists is read back, not retrained,
so the settings share the runs they have in common. Written to ``--out``
(default experiments/results/): ``mnist1d_methods.csv`` (one row per run), ``mnist1d_methods.md``
(mean ± std tables, differences to static, findings) and ``mnist1d_methods_<model>.png`` (accuracy
vs sparsity with std error bars, :func:`sparsetrain.plot.accuracy_vs_sparsity` on
:func:`sparsetrain.apps.report.group_jobs`).

    python experiments/mnist1d_methods.py            # 5 seeds, about an hour on 2 CPU cores
    python experiments/mnist1d_methods.py --quick    # seeds 0 and 1
    python experiments/mnist1d_methods.py --settings defaults --models mlp --sparsities 0.95 0.98 \\
        --name mnist1d_defaults                      # the configs' defaults, as a new user would run them
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"mlp": "experiment=mnist1d_mlp", "cnn": "experiment=mnist1d_cnn"}
SPARSITIES = [0.8, 0.9, 0.95, 0.98]
LAYERS = {"mlp": ["fc1", "fc2", "fc3"], "cnn": ["features.0", "features.2", "features.4", "fc"]}
# methods that run at one sparsity only, whatever --sparsities says
FIXED = {"dense": 0.0, "srste": 0.5}
# the configs' defaults: what `sparsetrain-train sparsity=<name> sparsity.method.sparsity=<s>` runs
DEFAULTS = {
    "dense": ["sparsity=dense"],
    "static": ["sparsity=static"],
    "set": ["sparsity=set"],
    "rigl": ["sparsity=rigl"],
    "gmp": ["sparsity=gmp"],  # uniform budgets
    "granet": ["sparsity=granet"],  # dense start, global magnitude pruning
    "annealing": ["sparsity=annealing"],  # uniform magnitude target chosen at step 0, annealed until 0.5
    "srste": ["sparsity=srste"],
}
# the settings of the study: the configs' defaults except where the comment says why
RECOMMENDED = {
    "dense": ["sparsity=dense"],
    "static": ["sparsity=static"],  # ERK random masks (Liu et al. 2022)
    # every 0.02 of training (30 MLP / 80 CNN steps), drop fraction 0.3 cosine-decayed to 0 at 0.75 of training
    "set": ["sparsity=set"],
    "rigl": ["sparsity=rigl"],
    # ERK budgets instead of the default uniform ones, which starve the 40-input first and 10-output last layers
    "gmp": ["sparsity=gmp", "sparsity.method.distribution=erk"],
    # sparse-to-sparse from an ERK mask at density 0.5 (the paper's ImageNet setting) instead of dense-to-sparse,
    # whose global threshold leaves the MLP's last layer ~1 % of its weights
    "granet": ["sparsity=granet", "sparsity.method.initial_density=0.5"],
    # from scratch in the same budget: dense until 0.25 of training, the ERK magnitude target chosen there,
    # the other weights annealed out (tau0 = 0.5, linear) until 0.6, static sparse after
    "annealing": ["sparsity=annealing", "sparsity.method.start=0.25", "sparsity.method.end=0.6",
                  "sparsity.method.distribution=erk"],
    # the CNN's layers have input sizes 5, 75, 75 and 125, none a multiple of 4: pruned 50 % unstructured there
    "srste": ["sparsity=srste", "sparsity.method.indivisible=unstructured"],
}
# why GMP, GraNet and annealing fall below static with their defaults: the layer budgets, one change at a time
ABLATION = {
    "static": RECOMMENDED["static"],
    "rigl": RECOMMENDED["rigl"],
    "gmp_uniform": DEFAULTS["gmp"],
    "gmp_global": ["sparsity=gmp", "sparsity.method.distribution=global"],
    "gmp_erk": RECOMMENDED["gmp"],
    "granet_dense_global": DEFAULTS["granet"],
    "granet_dense_layerwise": ["sparsity=granet", "sparsity.method.pruning=layerwise"],
    "granet_erk50_layerwise": [*RECOMMENDED["granet"], "sparsity.method.pruning=layerwise"],
    "granet_erk50_global": RECOMMENDED["granet"],
    "annealing_default": DEFAULTS["annealing"],
    "annealing_uniform": RECOMMENDED["annealing"][:-1],
    "annealing_erk": RECOMMENDED["annealing"],
}
LABELS = {"dense": "dense", "static": "static (ERK)", "set": "SET", "rigl": "RigL", "gmp": "GMP", "granet": "GraNet",
          "annealing": "annealing", "srste": "SR-STE 2:4",
          "gmp_uniform": "GMP, uniform (default)", "gmp_global": "GMP, global", "gmp_erk": "GMP, ERK",
          "granet_dense_global": "GraNet, dense start, global (default)",
          "granet_dense_layerwise": "GraNet, dense start, layer-wise",
          "granet_erk50_layerwise": "GraNet, ERK 0.5 start, layer-wise",
          "granet_erk50_global": "GraNet, ERK 0.5 start, global",
          "annealing_default": "annealing, uniform, steps 0-0.5 (default)",
          "annealing_uniform": "annealing, uniform, steps 0.25-0.6", "annealing_erk": "annealing, ERK, steps 0.25-0.6"}  # fmt: skip
SETTINGS = {"recommended": RECOMMENDED, "defaults": DEFAULTS, "ablation": ABLATION}
# every run: no checkpoints, no logger, no validation loop (val_size=0 would validate on the test set)
FAST = ["data.val_size=0", "callbacks=none", "~logger", "+trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]  # fmt: skip
FIELDS = ["settings", "model", "method", "sparsity", "seed", "test_acc", "measured_sparsity", "layer_kept",
          "steps", "seconds"]  # fmt: skip


def variant(overrides: list[str]) -> str:
    """A folder name for a method's overrides: ``["sparsity=gmp", "sparsity.method.distribution=erk"]`` ->
    ``gmp,distribution=erk``."""
    return ",".join(o.removeprefix("sparsity=").removeprefix("sparsity.method.") for o in overrides)


def run(settings: str, model: str, method: str, sparsity: float, seed: int, folder: Path, data_root: str,
        extra: tuple[str, ...] = ()) -> dict:
    """One ``sparsetrain-train`` run (or its summary, when ``folder`` has one): a row of the csv."""
    summary_file = folder / "summary.json"
    trained = not summary_file.is_file()
    if trained:
        import torch
        from hydra import compose, initialize_config_dir

        from sparsetrain.apps.train import config_dir, train

        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")
        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "sparsetrain"):
            logging.getLogger(name).setLevel(logging.ERROR)
        overrides = [MODELS[model], *SETTINGS[settings][method], *FAST, f"data.root={data_root}", f"seed={seed}",
                     f"paths.output_dir='{folder}'", *extra]  # fmt: skip
        if method not in FIXED:
            overrides.append(f"sparsity.method.sparsity={sparsity}")
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            train(compose("train", overrides=overrides))
    summary = json.loads(summary_file.read_text())
    return {
        "settings": settings,
        "model": model,
        "method": method,
        "sparsity": sparsity,
        "seed": seed,
        "test_acc": round(summary["test_acc"], 6),
        "measured_sparsity": round(summary["sparsity"], 6),
        "layer_kept": " ".join(str(layer["numel"] - layer["zeros"]) for layer in summary["layers"].values()),
        "steps": summary["steps"],
        "seconds": summary["wall_time_s"],
        "trained": trained,
    }


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def accuracy_table(rows: list[dict], model: str, methods: list[str]) -> list[str]:
    """Methods x sparsity columns, mean ± std of the test accuracy (%); dense fills every column."""
    mine = [r for r in rows if r["model"] == model]
    columns = sorted({r["sparsity"] for r in mine if r["method"] != "dense"})

    def cell(method, s):
        accs = [r["test_acc"] for r in mine if r["method"] == method and (method == "dense" or r["sparsity"] == s)]
        return _mean_std(accs) if accs else "—"

    head = [f"{100 * s:g} %" + (" (2:4)" if s == FIXED["srste"] else "") for s in columns]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {LABELS[m]} | " + " | ".join(cell(m, s) for s in columns) + " |" for m in methods
              if any(r["method"] == m for r in mine)]  # fmt: skip
    return lines


def difference_table(rows: list[dict], model: str, methods: list[str], reference: str = "static") -> list[str]:
    """Accuracy minus the reference method's, same seed and sparsity: mean (seeds better/worse)."""
    mine = [r for r in rows if r["model"] == model]
    columns = sorted({r["sparsity"] for r in mine if r["method"] == reference})

    def cell(method, s):
        base = {r["seed"]: r["test_acc"] for r in mine if r["method"] == reference and r["sparsity"] == s}
        other = {r["seed"]: r["test_acc"] for r in mine if r["method"] == method and r["sparsity"] == s}
        diff = [other[k] - base[k] for k in sorted(set(base) & set(other))]
        if not diff:
            return "—"
        return f"{100 * statistics.mean(diff):+.2f} ({sum(d > 0 for d in diff)}/{sum(d < 0 for d in diff)})"

    others = [m for m in methods if m not in (reference, "dense") and m not in FIXED and any(r["method"] == m for r in mine)]
    lines = ["| method | " + " | ".join(f"{100 * s:g} %" for s in columns) + " |", "|---|" + "---:|" * len(columns)]
    return lines + [f"| {LABELS[m]} | " + " | ".join(cell(m, s) for s in columns) + " |" for m in others]


def kept_table(rows: list[dict], model: str, methods: list[str]) -> list[str]:
    """Weights kept per layer at the end (mean over seeds, counted from the weights), with "(!)" where the
    library's starved-layer warning fires (a tenth of a layer's units cut off, :mod:`sparsetrain.core.starved`)."""
    from sparsetrain.apps.models import build_model
    from sparsetrain.core.starved import starved_layers

    net = build_model(f"mnist1d_{model}", num_classes=10, in_chans=1, img_size=40)
    shapes = {f"net.{n}": tuple(p.shape) for n, p in net.named_parameters() if n.endswith("weight")}
    mine = [r for r in rows if r["model"] == model and r["method"] != "dense"]
    columns = sorted({r["sparsity"] for r in mine})

    def cell(method, s):
        kept = [[int(k) for k in r["layer_kept"].split()] for r in mine if r["method"] == method and r["sparsity"] == s]
        if not kept:
            return "—"
        mean = [round(statistics.mean(layer)) for layer in zip(*kept)]
        starved = starved_layers(dict(zip(shapes, mean)), shapes)
        return " / ".join(f"{k:,}" + (" (!)" if name in starved else "") for name, k in zip(shapes, mean))

    lines = ["| method | " + " | ".join(f"{100 * s:g} %" for s in columns) + " |", "|---|" + "---:|" * len(columns)]
    return lines + [f"| {LABELS[m]} | " + " | ".join(cell(m, s) for s in columns) + " |" for m in methods
                    if any(r["method"] == m for r in mine)]  # fmt: skip


def plot(runs: Path, model: str, methods: dict[str, list[str]], path: Path) -> None:
    """``sparsetrain-report``'s grouping and plot over the run folders of one model (SR-STE's 50 % left out)."""
    from sparsetrain.apps.report import group_jobs, load_jobs
    from sparsetrain.plot import accuracy_vs_sparsity

    labels = {variant(overrides): "Dense" if method == "dense" else LABELS[method]
              for method, overrides in methods.items() if method == "dense" or method not in FIXED}  # fmt: skip
    jobs = [{**job, "method": labels[Path(job["job"]).parts[0]]} for job in load_jobs(runs / model)
            if Path(job["job"]).parts[0] in labels]  # fmt: skip
    groups = group_jobs(jobs)
    seeds = sorted({g["n_seeds"] for g in groups})
    title = f"MNIST-1D, {model.upper()}: test accuracy vs sparsity\nmean ± std over {'-'.join(map(str, seeds))} seeds"
    accuracy_vs_sparsity(groups, path, title=title)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=None, choices=[*RECOMMENDED, *ABLATION],
                        help="default: every method of --settings")
    parser.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--quick", action="store_true", help="seeds 0 and 1 only")
    parser.add_argument("--settings", default="recommended", choices=list(SETTINGS))
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes, one thread each)")
    parser.add_argument("--runs", type=Path, default=Path("outputs/mnist1d_methods"), help="run folders")
    parser.add_argument("--data-root", default="data", help="data.root: where the MNIST-1D cache lives")
    parser.add_argument("--name", default="mnist1d_methods", help="file names of the results")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run (smoke tests: trainer.max_steps=20)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: experiments/results)")
    args = parser.parse_args(argv)
    seeds = [0, 1] if args.quick else args.seeds
    args.methods = args.methods or list(SETTINGS[args.settings])
    command = "python experiments/mnist1d_methods.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    runs, methods = args.runs, SETTINGS[args.settings]
    jobs = [
        (args.settings, model, method, s, seed, runs / model / variant(methods[method]) / f"s{s:g}" / f"seed{seed}",
         args.data_root, tuple(args.extra))
        for model in args.models
        for method in args.methods
        for s in ([FIXED[method]] if method in FIXED else args.sparsities)
        for seed in seeds
    ]
    from sparsetrain.apps.data import MNIST1DDataModule

    MNIST1DDataModule(root=args.data_root).prepare_data()  # generate the cache once, before the workers start
    started, rows = time.perf_counter(), []
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{args.name}.csv", "w", newline="") as f, ProcessPoolExecutor(args.jobs) as pool:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in pool.map(run, *zip(*jobs)):
            rows.append(row)
            writer.writerow(row)
            f.flush()
            print(f"{row['model']} {row['method']:13s} s={row['sparsity']:.2f} seed={row['seed']} "
                  f"acc={row['test_acc']:.4f} measured={row['measured_sparsity']:.4f} "
                  f"kept={row['layer_kept']} ({row['seconds']:.1f} s)", flush=True)  # fmt: skip
    minutes = (sum(r["seconds"] for r in rows) / 60, (time.perf_counter() - started) / 60)
    lines = [f"# {args.name}: {args.settings} settings", ""]
    for model in args.models:
        lines += [f"## {model}", "", *accuracy_table(rows, model, args.methods), "",
                  "Difference to static (ERK), same seed, percentage points: mean (seeds better/worse)", "",
                  *difference_table(rows, model, args.methods), "",
                  *(["RigL minus SET, same seed: mean (seeds better/worse)", "",
                     *difference_table(rows, model, ["rigl"], reference="set"), ""]
                    if {"rigl", "set"} <= set(args.methods) else []),
                  "Weights kept per layer (" + ", ".join(f"`{n}`" for n in LAYERS[model]) + "; mean over seeds, counted "
                  "from the weights); (!): so few that at least a tenth of the layer's output or input units have no "
                  "weight whatever the mask, and the library warns", "", *kept_table(rows, model, args.methods), ""]  # fmt: skip
        if args.settings == "recommended":
            plot(runs, model, methods, args.out / f"{args.name}_{model}.png")
            lines += [f"![{model}]({args.name}_{model}.png)", ""]
    trained = sum(r["trained"] for r in rows)
    lines += [f"{len(rows)} runs, {minutes[0]:.1f} min of training summed over runs; this invocation trained {trained} "
              f"of them in {minutes[1]:.1f} min wall time with {args.jobs} jobs on 2 CPU cores"
              + (" (the others were read back from their run folders)." if trained < len(rows) else "."),
              "", "```bash", command.strip(), "```", ""]  # fmt: skip
    (args.out / f"{args.name}.md").write_text("\n".join(lines))
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
