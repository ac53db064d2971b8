"""Cost of stochastic subnetwork annealing: training-step time against static masks and dense.

Everything runs in one process, interleaved in rounds (dense, static, annealing, ..., dense,
...) so that every variant sees the same machine state. A round trains a fresh copy of the
model with a real Lightning Trainer for two epochs of ``--steps`` batches; only the second
epoch is timed, from ``on_train_batch_start`` of the first callback to the end of
``on_train_batch_end`` of the last: forward, backward, optimizer step and all mask work.

Variants (90 % sparsity, steady state):

* ``dense``: no callback;
* ``static``: ``Static(0.9, "erk")``: hard masks, gradients masked every step;
* ``annealing``: ``StochasticAnnealing(0.9)`` with ``end`` beyond the run, so every step
  samples: one 24-bit random draw per target weight, ``w * (mask | (u < p))`` swapped into the
  model, the mask applied again by autograd in the backward; eager kernel;
* ``annealing_random``: the same with per-weight probabilities (one more float per weight read);
* ``annealing_compiled``: the ``torch.compile``\\ d kernel (CPU: inductor C++; CUDA: Triton).

Besides whole steps, the script times the mask work alone over all targets of the model
(median of ``--repeats``): drawing the random numbers, the sampled weights' forward+backward, and the
static per-step gradient multiply, eager and compiled. On CUDA (when available) the same
variants run on the GPU, eager and compiled.

    python experiments/bench_annealing.py                                  # resnet18 32px b16 and digits_cnn b64
    python experiments/bench_annealing.py --configs resnet18:32:64 --rounds 5

Writes ``<out>/bench_annealing.md`` and ``.csv`` (default experiments/results/; ``--out DIR`` to change it).
"""

from __future__ import annotations

import argparse
import copy
import csv
import platform
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from timing import Classifier, StepEnd, StepStart  # same timing as the overhead benchmark

from sparsetrain import SparsityCallback
from sparsetrain.apps.models import LOCAL_MODELS, build_model
from sparsetrain.core import budget_masks, random_scores, select_targets
from sparsetrain.core.kernels import MaskKernel
from sparsetrain.core.stochastic import StochasticKernel
from sparsetrain.methods import Static, StochasticAnnealing

RESULTS = Path(__file__).parent / "results"
VARIANTS = ["dense", "static", "annealing", "annealing_random", "annealing_compiled"]


def make_callbacks(variant: str) -> list[L.Callback]:
    if variant == "static":
        return [SparsityCallback(Static(sparsity=0.9, distribution="erk"), kernel="eager")]
    if variant.startswith("annealing"):
        method = StochasticAnnealing(0.9, end=10**9, probabilities="random" if variant == "annealing_random" else "constant")
        return [SparsityCallback(method, kernel="compiled" if variant == "annealing_compiled" else "eager")]
    return []


def run_round(base: nn.Module, loader: DataLoader, variant: str, accelerator: str) -> list[float]:
    start = StepStart()
    end = StepEnd(start)
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[start, *make_callbacks(variant), end])
    trainer.fit(Classifier(copy.deepcopy(base)), loader)
    return end.times[len(loader):]


def median_time(fn, repeats: int, cuda: bool) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_times(model: nn.Module, device: torch.device, repeats: int) -> dict[str, float]:
    """Mask work alone over all targets of ``model`` (seconds per step)."""
    model = copy.deepcopy(model).to(device)
    targets = select_targets(model)
    weights = list(targets.values())
    masks = budget_masks(random_scores(targets, torch.Generator().manual_seed(0)), 0.9, "uniform")
    masks = [masks[n].to(device) for n in targets]
    const = [torch.tensor(0.5, device=device) for _ in weights]
    cuda = device.type == "cuda"
    out: dict[str, float] = {}
    upstream = [torch.ones_like(w) for w in weights]
    for kind in ("eager", "compiled"):
        sampler = StochasticKernel(kind)
        out[f"draws ({kind})"] = median_time(lambda: sampler.draws(weights, 1), repeats, cuda) if kind == "eager" else None

        def fwd_bwd(sampler=sampler):
            sampled = sampler.sample(weights, masks, const, 0.5, 1)
            torch.autograd.backward(sampled, upstream)

        out[f"sample fwd+bwd ({kind})"] = median_time(fwd_bwd, repeats, cuda)
        mask_kernel = MaskKernel(kind)
        grads = [torch.randn_like(w) for w in weights]
        out[f"static grad mask ({kind})"] = median_time(lambda: mask_kernel(grads, masks), repeats, cuda)
        for w in weights:
            w.grad = None
    return {k: v for k, v in out.items() if v is not None}


def bench_config(spec: str, rounds: int, steps: int, repeats: int, accelerator: str) -> tuple[list[dict], dict, int]:
    name, size, batch = spec.split(":")
    size, batch = int(size), int(batch)
    torch.manual_seed(0)
    if name in LOCAL_MODELS:
        chans = 1 if name == "digits_cnn" else 3
        model = build_model(name, num_classes=10, in_chans=chans, img_size=size)
    else:
        chans = 3
        model = torchvision.models.get_model(name, num_classes=10)
    n = batch * steps
    data = TensorDataset(torch.randn(n, chans, size, size), torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=batch)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            times[variant] += run_round(model, loader, variant, accelerator)
    dense = statistics.median(times["dense"])
    fastest = min(times["dense"])
    rows = [{"config": spec, "device": accelerator, "variant": v, "median_step_s": round(statistics.median(t), 5),
             "ratio_vs_dense": round(statistics.median(t) / dense, 4), "min_step_s": round(min(t), 5),
             "min_ratio_vs_dense": round(min(t) / fastest, 4), "timed_steps": len(t)} for v, t in times.items()]
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    n_targets = sum(p.numel() for p in select_targets(model).values())
    return rows, kernel_times(model, device, repeats), n_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["resnet18:32:16", "digits_cnn:8:64"],
                        help="model:image_size:batch_size (torchvision name or an in-repo model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="batches per epoch; a round is 2 epochs, the 2nd timed")
    parser.add_argument("--repeats", type=int, default=10, help="repeats of the kernel-only timings")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: experiments/results)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    accelerators = ["cpu"] + (["gpu"] if torch.cuda.is_available() else [])
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    lines = [
        "# Step time of stochastic subnetwork annealing vs static masks vs dense",
        "",
        f"Machine: {machine}. Command: `python experiments/bench_annealing.py --configs {' '.join(args.configs)} "
        f"--rounds {args.rounds} --steps {args.steps} --repeats {args.repeats} --threads {args.threads}`. "
        "Interleaved rounds in one process; 90 % sparsity; SGD with momentum; variants in the script's docstring. "
        "The machine is shared: the fastest step (noise only adds time) is the steadier estimate of the cost.",
        "",
    ]
    all_rows = []
    for accelerator in accelerators:
        for spec in args.configs:
            rows, kernels, n_targets = bench_config(spec, args.rounds, args.steps, args.repeats, accelerator)
            all_rows += rows
            lines += [f"## {spec.replace(':', ', ', 1).replace(':', 'px, batch ')} on {accelerator.upper()} "
                      f"({n_targets:,} target weights)", "",
                      "| variant | median step (s) | ratio vs dense | fastest step (s) | ratio vs dense | timed steps |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['variant']} | {r['median_step_s']:.4f} | {r['ratio_vs_dense']:.3f} | {r['min_step_s']:.4f} | "
                      f"{r['min_ratio_vs_dense']:.3f} | {r['timed_steps']} |" for r in rows]
            lines += ["", "Mask work alone, all targets, per step (median):", "",
                      "| operation | ms |", "|---|---|"]
            lines += [f"| {k} | {1000 * v:.2f} |" for k, v in kernels.items()]
            lines.append("")
            print("\n".join(lines[-(len(rows) + len(kernels) + 8):]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench_annealing.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(all_rows[0]))
        writer.writeheader()
        writer.writerows(all_rows)
    lines += [
        "Memory: annealing keeps the bool target masks (1 byte per target weight, as static) plus, with",
        "`probabilities=random`, one float32 per weight. During a training step it holds per target an",
        "int32 draw (freed once the sample is made), the sampled weight (4 bytes, alive until its backward,",
        "like any weight the forward saves) and the 1-byte keep mask autograd saves for the backward.",
        "",
    ]
    (args.out / "bench_annealing.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
