"""Per-step overhead of sparsetrain and its peers against a dense run of the same model, in one process.

Every method trains a fresh copy of the same model on the same data with a real Lightning
Trainer, in short runs that take turns: a round runs every method once, and the order of
the methods rotates from round to round (later runs in a round measured slower). A run is two
epochs of ``--steps`` batches; only the second is timed (warm-up, and Lightning's
``ModelPruning`` prunes at the end of the first). A step is timed from
``on_train_batch_start`` to the end of ``on_train_batch_end``: forward, backward, optimizer
step and all mask work. Each round gives every method's median step; its ratio to the dense
median of the same round is paired, which cancels the slow drift of the machine, and the
table gives the median over rounds with a 95 % bootstrap interval. (Interleaving single
steps by running the Trainers in threads was tried and dropped: Lightning in a worker thread
ran every op about 1.6x slower on CPU here, where plain PyTorch did not.)

Methods: ``dense``; ``dense_again`` (a second dense run: its ratio is the noise floor);
``gmp`` / ``gmp_compiled`` (sparsetrain GMP at 90 %, steady state, eager or ``torch.compile``d
mask kernel); ``static`` (90 % ERK); ``rigl`` (90 % ERK, ``every=100``: the steady step plus
1/100 of the extra time of a run that updates after every step); ``torch_prune``
(``torch.nn.utils.prune.global_unstructured`` L1 at 90 %, applied before training);
``modelpruning`` (Lightning's ``ModelPruning("l1_unstructured", amount=0.9,
use_global_unstructured=True)``, its defaults otherwise). Whole-step ratios carry the machine's
noise, so two direct measurements come with them. "Added work" comes from ``--profiled-runs``
more runs of each method under ``torch.profiler`` (``timing.ProfiledWork``): sparsetrain's
per-step hooks, and for the peers the forward hooks computing ``weight_orig * weight_mask``
plus the backward of that multiply. "Mask work" is sparsetrain's hooks timed with
``perf_counter`` during the rounds, with no profiler. Extra memory per target weight is counted
from the tensors each method keeps (sparsetrain: its masks; torch prune: ``weight_mask`` and
the recomputed ``weight``).

    python experiments/bench_overhead.py                       # ResNet-18, 32x32, batch 64, CPU
    python experiments/bench_overhead.py --model resnet50 --image-size 224 --batch-size 32 --rounds 3 --steps 3
    python experiments/bench_overhead.py --device cuda --batch-size 128   # bf16 on a GPU

Writes ``<out>/overhead_<device>_<model>_<size>_b<batch>.md`` and ``.csv`` (default experiments/results/;
``--out DIR`` to change it); ``bench_overhead_grid.py`` runs the grid the README shows.
"""

from __future__ import annotations

import argparse
import copy
import csv
import platform
import random
import statistics
import time
from pathlib import Path

import lightning as L
import timm
import torch
import torchvision
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset
from timing import MUL_BACKWARD, Classifier, HookTimer, ProfiledWork, StepEnd, StepStart

from sparsetrain import SparsityCallback
from sparsetrain.core import budget_masks, magnitude_scores, select_targets
from sparsetrain.methods import GMP, RigL, Static

RESULTS = Path(__file__).parent / "results"
METHODS = "dense,dense_again,gmp,gmp_compiled,static,rigl,torch_prune,modelpruning"
PEERS = ("torch_prune", "modelpruning")
PROFILED_RUNS = 2


def make_callbacks(method: str) -> list[L.Callback]:
    """The callbacks that make ``method`` sparse (nothing for dense and pre-pruned torch_prune)."""
    if method in ("gmp", "gmp_compiled"):  # steady state of a GMP run: 90 % from fit start on
        gmp = GMP(sparsity=0.9, initial_sparsity=0.9, start=0, end=0, every=1)
        return [SparsityCallback(gmp, kernel="compiled" if method == "gmp_compiled" else "eager")]
    if method == "static":
        return [SparsityCallback(Static(sparsity=0.9, distribution="erk"))]
    if method.startswith("rigl"):  # rigl: steady state; rigl_every1: an update after every step
        every = 1 if method == "rigl_every1" else 10**9
        return [SparsityCallback(RigL(sparsity=0.9, every=every, end=1.0, drop_fraction_schedule="constant"))]
    if method == "modelpruning":
        return [ModelPruning("l1_unstructured", amount=0.9, use_global_unstructured=True, verbose=0)]
    return []


def torch_prune(model: nn.Module) -> None:
    """The plain PyTorch way: reparametrise every target with a global L1 mask."""
    modules = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]  # the same targets as ours
    prune.global_unstructured([(m, "weight") for m in modules], prune.L1Unstructured, amount=0.9)


def extra_bytes_per_weight(model: nn.Module, callbacks: list[L.Callback], n: int) -> float:
    """Memory a method keeps beyond the dense model, per target weight (``n`` of them), from its tensors."""
    extra = 0
    for cb in callbacks:
        if isinstance(cb, SparsityCallback) and cb.masks is not None:
            extra += sum(m.numel() * m.element_size() for m in cb.masks.values())
    for module in model.modules():
        if hasattr(module, "weight_mask"):  # torch.nn.utils.prune: mask buffer + recomputed weight
            extra += module.weight_mask.numel() * module.weight_mask.element_size()
            extra += module.weight.numel() * module.weight.element_size()
    return extra / n


class Run:
    """One method's short Trainer run on a fresh copy of the model: its step times, mask-work times, extra memory."""

    def __init__(self, method: str, base: nn.Module, loader: DataLoader, device: str, profiled: bool = False):
        self.method, self.loader = method, loader
        self.model = copy.deepcopy(base)
        n_targets = sum(p.numel() for p in select_targets(self.model).values())
        if method == "torch_prune":
            torch_prune(self.model)
        self.sparsity = make_callbacks(method)
        self.hooks = [HookTimer(cb, device == "cuda") for cb in self.sparsity if isinstance(cb, SparsityCallback)]
        self.profiler = [ProfiledWork(self.sparsity, device == "cuda")] if profiled else []
        start = StepStart()
        self.end = StepEnd(start, lambda: extra_bytes_per_weight(self.model, self.sparsity, n_targets))
        self.trainer = L.Trainer(
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            precision="bf16-mixed" if device == "cuda" else "32-true",
            max_epochs=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[*self.profiler, start, *self.sparsity, self.end],
        )
        self.trainer.fit(Classifier(self.model), loader)

    def step_times(self) -> list[float]:
        return self.end.times[len(self.loader) :]  # second epoch only

    def mask_times(self) -> list[float]:
        return self.hooks[0].seconds()[len(self.loader) :] if self.hooks else []


def median_ci(values: list[float], rounds: int = 2000) -> tuple[float, float, float]:
    """Median and its 95 % percentile-bootstrap interval."""
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(rounds))
    return statistics.median(values), boot[int(0.025 * rounds)], boot[int(0.975 * rounds) - 1]


def build_model(name: str, image_size: int, patch_size: int) -> nn.Module:
    torch.manual_seed(0)
    if name in torchvision.models.list_models():
        return torchvision.models.get_model(name, num_classes=10)
    kwargs = {"img_size": image_size, "patch_size": patch_size} if name.startswith("vit_") else {}
    return timm.create_model(name, num_classes=10, **kwargs)  # ViTs get the image size and patch size


def benchmark(
    model="resnet18",
    image_size=32,
    batch_size=64,
    rounds=8,
    steps=5,
    methods=METHODS,
    device="cpu",
    patch_size=16,
    profiled_runs=PROFILED_RUNS,
):
    """Runs every method ``rounds`` times in rotated order; one summary row per method, and the GMP update time."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    base = build_model(model, image_size, patch_size)
    if device == "cuda":
        base = base.cuda()  # the copies start on the GPU; the data moves per batch
    n = batch_size * steps
    data = TensorDataset(torch.randn(n, 3, image_size, image_size), torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=batch_size)
    names = methods.split(",")
    timed = names + (["rigl_every1"] if "rigl" in names else [])
    step_times = {m: [] for m in timed}  # per round: that run's timed steps
    mask_times = {m: [] for m in timed}
    extra_bytes = {}
    for r in range(rounds):
        for m in timed[r % len(timed) :] + timed[: r % len(timed)]:
            run = Run(m, base, loader, device)
            step_times[m].append(run.step_times())
            mask_times[m] += run.mask_times()
            extra_bytes[m] = run.end.extra_bytes

    profiled = {m: [] for m in ["dense"] + [m for m in names if m not in ("dense", "dense_again")]}
    for _ in range(profiled_runs):  # more runs of each method, profiled: the work each adds per step, in ms
        for m in profiled:
            profiled[m].append(Run(m, base, loader, device, profiled=True).profiler[0].per_step_ms())
    dense_mul = statistics.mean(w[MUL_BACKWARD] for w in profiled["dense"])
    added = {  # per profiled run
        m: [w["sparsetrain"] + w["prune_forward"] + max(w[MUL_BACKWARD] - dense_mul, 0.0) for w in runs]
        for m, runs in profiled.items()
    }

    times = {m: [statistics.median(t) for t in per_round] for m, per_round in step_times.items()}  # per round
    mask = {m: statistics.median(t) if t else None for m, t in mask_times.items()}
    if "rigl" in names:  # amortise the update cost, measured in the same round, over every=100 steps
        times["rigl"] = [r + max(e - r, 0.0) / 100 for r, e in zip(times["rigl"], times["rigl_every1"])]
        update_share = max(mask["rigl_every1"] - mask["rigl"], 0.0) / 100  # seconds per step, from the timed hooks
        mask["rigl"] += update_share
        added["rigl"] = [a + update_share * 1000 for a in added["rigl"]]
    dense = times["dense"]
    dense_median = statistics.median(dense)
    rows = []
    for m in names:
        ratio, low, high = median_ci([t / d for t, d in zip(times[m], dense)])
        work = mask[m]
        rows.append({
            "device": device, "model": model, "image_size": image_size, "batch_size": batch_size, "method": m,
            "median_step_ms": round(statistics.median(times[m]) * 1000, 3),
            "ratio_vs_dense": round(ratio, 4), "ratio_ci_low": round(low, 4), "ratio_ci_high": round(high, 4),
            "mask_work_ms": None if work is None else round(work * 1000, 3),
            "mask_work_vs_dense_step": None if work is None else round(work / dense_median, 5),
            **added_columns(None if m in ("dense", "dense_again") else added[m], dense_median),
            "extra_bytes_per_weight": round(extra_bytes[m], 3),
            "rounds": rounds, "timed_steps": sum(len(t) for t in step_times[m]),
            "gap_to_gmp": None, "gap_ci_low": None, "gap_ci_high": None,
        })  # fmt: skip
        if m in PEERS and "gmp" in names:  # paired gap per round: (peer step - sparsetrain GMP step) / dense step
            gap = median_ci([(p - g) / d for p, g, d in zip(times[m], times["gmp"], dense)])
            rows[-1].update(zip(("gap_to_gmp", "gap_ci_low", "gap_ci_high"), (round(v, 5) for v in gap)))
    return rows, time_gmp_update(base), profiled_runs


def added_columns(added_ms: list[float] | None, dense_s: float) -> dict:
    """The profiled work a method adds per step: mean and range over the profiled runs, and against a dense step."""
    if not added_ms:
        return {"added_work_ms": None, "added_work_min_ms": None, "added_work_max_ms": None, "added_work_vs_dense_step": None}
    mean = statistics.mean(added_ms)
    return {
        "added_work_ms": round(mean, 3),
        "added_work_min_ms": round(min(added_ms), 3),
        "added_work_max_ms": round(max(added_ms), 3),
        "added_work_vs_dense_step": round(mean / 1000 / dense_s, 5),
    }


def time_gmp_update(model: nn.Module, repeats: int = 5) -> float:
    """Seconds for one GMP mask update: global magnitude top-k over every target weight."""
    targets = select_targets(model)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        budget_masks(magnitude_scores(targets), 0.9, "global")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_results(rows: list[dict], update_s: float, profiled_runs: int, command: str, out: Path = RESULTS) -> Path:
    r0 = rows[0]
    name = f"overhead_{r0['device']}_{r0['model']}_{r0['image_size']}_b{r0['batch_size']}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(r0))
        writer.writeheader()
        writer.writerows(rows)
    dense_s = rows[0]["median_step_ms"] / 1000
    lines = [
        f"# Step-time overhead: {r0['model']}, {r0['image_size']}x{r0['image_size']}, batch {r0['batch_size']}, "
        f"{r0['device'].upper()}",
        "",
        f"Machine: {machine(r0['device'])}. Command: `{command}`",
        "",
        "| method | median step (ms) | step ratio vs dense [95 % CI] | added work per step, profiled (ms, range) "
        "| added work / dense step | mask work in the hooks, timed (ms) | extra bytes / target weight | rounds x steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        added = (
            "– | –"
            if r["added_work_ms"] is None
            else f"{r['added_work_ms']:.2f} ({r['added_work_min_ms']:.2f}–{r['added_work_max_ms']:.2f}) "
            f"| {r['added_work_vs_dense_step']:.2%}"
        )
        hooks = "–" if r["mask_work_ms"] is None else f"{r['mask_work_ms']:.2f}"
        lines.append(
            f"| {r['method']} | {r['median_step_ms']:.1f} | {r['ratio_vs_dense']:.3f} "
            f"[{r['ratio_ci_low']:.3f}, {r['ratio_ci_high']:.3f}] | {added} | {hooks} "
            f"| {r['extra_bytes_per_weight']:.2f} | {r['rounds']} x {r['timed_steps'] // r['rounds']} |"
        )
    lines += [
        "",
        "Step ratio: median over rounds of (the method's median step / the dense median step of the same round), "
        f"with a 95 % bootstrap interval; dense_again shows the noise floor. Added work: from torch.profiler in "
        f"{profiled_runs} more run(s) of each method (mean and range), per step of the second epoch: sparsetrain's hooks; "
        "for torch prune and "
        "ModelPruning the forward hooks computing weight_orig * weight_mask and the backward of that multiply. "
        "Mask work: sparsetrain's hooks timed directly during the rounds (no profiler).",
        "",
    ]
    gmp = next((r for r in rows if r["method"] == "gmp"), None)
    for r in rows:
        if r["gap_to_gmp"] is not None:
            low = r["gap_ci_low"]
            verdict = "cheaper beyond the noise" if low > 0 else "not separable from it by whole steps"
            apart = "apart" if r["added_work_min_ms"] > gmp["added_work_max_ms"] else "overlapping"
            lines.append(
                f"- {r['method']} adds {r['added_work_ms']:.2f} ms per step (profiled) against "
                f"{gmp['added_work_ms']:.2f} ms for sparsetrain GMP ({r['added_work_ms'] / gmp['added_work_ms']:.1f}x; "
                f"ranges {apart}). "
                f"Whole steps, per round, {r['method']} minus GMP in dense steps: {r['gap_to_gmp']:+.2%} "
                f"[95 % CI {low:+.2%}, {r['gap_ci_high']:+.2%}]: GMP is {verdict}."
            )
    lines += [
        f"- One GMP mask update (global magnitude top-k): {update_s * 1000:.1f} ms, "
        f"{update_s / (100 * dense_s):.2%} of training time at every=100.",
    ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out / f"{name}.md"


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, bf16-mixed, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision or timm model name")
    parser.add_argument("--patch-size", type=int, default=16, help="ViTs only (4 suits 32x32 images)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8, help="runs of every method, in rotated order")
    parser.add_argument("--steps", type=int, default=5, help="batches per epoch; a run is 2 epochs, the 2nd timed")
    parser.add_argument("--methods", default=METHODS, help="dense_again is a second dense run: the noise floor")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--profiled-runs", type=int, default=PROFILED_RUNS, help="extra runs under torch.profiler")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: experiments/results)")
    args = parser.parse_args()
    rows, update_s, profiled_runs = benchmark(
        args.model,
        args.image_size,
        args.batch_size,
        args.rounds,
        args.steps,
        args.methods,
        args.device,
        args.patch_size,
        args.profiled_runs,
    )
    vit = f"--patch-size {args.patch_size} " if args.model.startswith("vit_") else ""
    command = (
        f"python experiments/bench_overhead.py --model {args.model} {vit}--image-size {args.image_size} "
        f"--batch-size {args.batch_size} --rounds {args.rounds} --steps {args.steps} --device {args.device}"
        + ("" if args.methods == METHODS else f" --methods {args.methods}")
        + ("" if args.profiled_runs == PROFILED_RUNS else f" --profiled-runs {args.profiled_runs}")
    )
    write_results(rows, update_s, profiled_runs, command, args.out)


if __name__ == "__main__":
    main()
