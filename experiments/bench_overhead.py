"""Per-step overhead of sparsetrain and its peers against a dense run, measured in one process.

The same model and data are trained with real Lightning Trainers in short interleaved
rounds (dense, gmp, ..., dense, gmp, ...) so that every method sees the same machine state;
the order rotates from round to round, since later runs in a round measured slower.
A round is two epochs of ``--steps`` batches on a fresh copy of the model; only the second
epoch is timed (warm-up, and Lightning's ``ModelPruning`` prunes at the end of the first).
A timing callback measures every step from ``on_train_batch_start`` to the end of
``on_train_batch_end``: forward, backward, optimizer step and all mask work.

Methods: ``dense``; ``dense_again`` (the same dense run a second time: its ratio is the
noise floor of the measurement); ``gmp`` / ``gmp_compiled`` (sparsetrain GMP at 90 %, steady state,
eager or ``torch.compile``d mask kernel); ``static`` (90 % ERK); ``rigl`` (90 % ERK,
``every=100``: the steady step plus the measured cost of one update divided by 100, the
update cost being the step-time difference of a run with ``every=1``); ``torch_prune``
(``torch.nn.utils.prune.global_unstructured`` L1 at 90 %, applied before the round);
``modelpruning`` (Lightning's ``ModelPruning("l1_unstructured", amount=0.9,
use_global_unstructured=True)``). Extra memory per target weight is counted from the tensors
each method keeps (sparsetrain: its masks; torch prune: ``weight_mask`` plus the recomputed
``weight``).

    python experiments/bench_overhead.py                       # ResNet-18, 32x32, batch 64
    python experiments/bench_overhead.py --image-size 224 --batch-size 32 --model resnet50

Writes ``experiments/results/overhead_<model>_<size>_b<batch>.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import timm
import torchvision
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from sparsetrain import SparsityCallback
from sparsetrain.core import budget_masks, magnitude_scores, select_targets
from sparsetrain.methods import GMP, RigL, Static

RESULTS = Path(__file__).parent / "results"


class Classifier(L.LightningModule):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def _sync(trainer: L.Trainer) -> None:
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize()


class StepStart(L.Callback):
    """First in the callback list: notes when a training step starts."""

    def __init__(self):
        self.t0 = 0.0

    def on_train_batch_start(self, trainer, *args):
        _sync(trainer)
        self.t0 = time.perf_counter()


class StepEnd(L.Callback):
    """Last in the callback list: records the whole step, mask work included, then (optionally) memory."""

    def __init__(self, start: StepStart, measure_memory=None):
        self.start, self.times, self.measure_memory, self.extra_bytes = start, [], measure_memory, 0.0

    def on_train_batch_end(self, trainer, *args):
        _sync(trainer)
        self.times.append(time.perf_counter() - self.start.t0)
        if self.measure_memory is not None:
            self.extra_bytes = self.measure_memory()  # outside the timed window


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


class HookTimer:
    """Wraps a SparsityCallback's per-step hooks and sums their time per step (the mask work itself)."""

    def __init__(self, cb: SparsityCallback):
        self.per_step: list[float] = []
        self._acc = 0.0
        for hook in ("on_before_optimizer_step", "on_train_batch_end"):
            setattr(cb, hook, self._timed(getattr(cb, hook), close_step=hook == "on_train_batch_end"))

    def _timed(self, fn, close_step: bool):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            fn(*args, **kwargs)
            self._acc += time.perf_counter() - t0
            if close_step:
                self.per_step.append(self._acc)
                self._acc = 0.0

        return wrapper


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


def run_round(base: nn.Module, loader: DataLoader, method: str) -> tuple[list[float], float, list[float]]:
    model = copy.deepcopy(base)
    n_targets = sum(p.numel() for p in select_targets(model).values())
    if method == "torch_prune":
        torch_prune(model)
    sparsity = make_callbacks(method)
    hooks = [HookTimer(cb) for cb in sparsity if isinstance(cb, SparsityCallback)]
    start = StepStart()
    end = StepEnd(start, lambda: extra_bytes_per_weight(model, sparsity, n_targets))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[start, *sparsity, end],
    )
    trainer.fit(Classifier(model), loader)
    hook_times = hooks[0].per_step[len(loader) :] if hooks else []
    return end.times[len(loader) :], end.extra_bytes, hook_times  # second epoch only


def time_gmp_update(model: nn.Module, repeats: int = 5) -> float:
    targets = select_targets(model)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        budget_masks(magnitude_scores(targets), 0.9, "global")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision or timm model name")
    parser.add_argument("--patch-size", type=int, default=16, help="ViTs only (4 suits 32x32 images)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="batches per epoch; a round is 2 epochs, the 2nd timed")
    parser.add_argument(
        "--methods",
        default="dense,dense_again,gmp,gmp_compiled,static,rigl,torch_prune,modelpruning",
        help="dense_again is a second dense run: its ratio shows the noise floor",
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.model in torchvision.models.list_models():
        model = torchvision.models.get_model(args.model, num_classes=10)
    else:  # a timm name, e.g. vit_tiny_patch16_224: ViTs get the image size and --patch-size
        kwargs = {"img_size": args.image_size, "patch_size": args.patch_size} if args.model.startswith("vit_") else {}
        model = timm.create_model(args.model, num_classes=10, **kwargs)
    n = args.batch_size * args.steps  # one epoch = --steps batches
    data = TensorDataset(torch.randn(n, 3, args.image_size, args.image_size), torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=args.batch_size)
    methods = args.methods.split(",")
    timed = methods + (["rigl_every1"] if "rigl" in methods else [])
    times: dict[str, list[float]] = {m: [] for m in timed}
    hook_times: dict[str, list[float]] = {m: [] for m in timed}
    memory: dict[str, float] = {}
    for r in range(args.rounds):  # rotate the order: later runs in a round tend to be slower
        for method in timed[r % len(timed) :] + timed[: r % len(timed)]:
            step_times, memory[method], hooks = run_round(model, loader, method)
            times[method] += step_times
            hook_times[method] += hooks

    n_targets = sum(p.numel() for p in select_targets(model).values())
    update = time_gmp_update(model)
    median = {m: statistics.median(t) for m, t in times.items()}
    if "rigl" in methods:  # amortise the measured update cost over every=100 steps
        median["rigl"] += max(median["rigl_every1"] - median["rigl"], 0.0) / 100
    dense = median["dense"]
    mask_ms = {m: statistics.median(t) * 1000 if t else None for m, t in hook_times.items()}
    if "rigl" in methods:
        mask_ms["rigl"] += max(mask_ms["rigl_every1"] - mask_ms["rigl"], 0.0) / 100
    rows = [
        {
            "method": m,
            "median_step_s": round(median[m], 5),
            "ratio_vs_dense": round(median[m] / dense, 4),
            "mask_work_ms": None if mask_ms[m] is None else round(mask_ms[m], 2),
            "mask_work_vs_dense_step": None if mask_ms[m] is None else round(mask_ms[m] / 1000 / dense, 4),
            "extra_bytes_per_weight": round(memory[m], 3),
            "timed_steps": len(times[m]),
        }
        for m in methods
    ]

    name = f"overhead_{args.model}_{args.image_size}_b{args.batch_size}"
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = [
        f"# Step-time overhead: {args.model}, {args.image_size}x{args.image_size}, batch {args.batch_size}, CPU",
        "",
        f"Machine: {machine}. Command: `python experiments/bench_overhead.py --model {args.model} "
        + (f"--patch-size {args.patch_size} " if args.model.startswith("vit_") else "")
        + f"--image-size {args.image_size} --batch-size {args.batch_size} --rounds {args.rounds} --steps {args.steps} --methods {args.methods}`",
        "",
        "| method | median step (s) | step ratio vs dense | mask work per step (ms) | mask work / dense step "
        "| extra bytes / target weight | timed steps |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['method']} | {r['median_step_s']:.4f} | {r['ratio_vs_dense']:.3f} | "
            + ("n/a | n/a" if r["mask_work_ms"] is None else f"{r['mask_work_ms']:.1f} | {r['mask_work_vs_dense_step']:.2%}")
            + f" | {r['extra_bytes_per_weight']:.2f} | {r['timed_steps']} |"
            for r in rows
        ],
        "",
        "Step ratio: median whole-step time against dense (dense_again shows the noise). Mask work: "
        "time spent inside the SparsityCallback's per-step hooks, measured directly (torch.nn.utils.prune "
        "and ModelPruning work inside the forward pass, so only their step ratio is available).",
        "",
        f"One GMP mask update (global magnitude top-k over {n_targets:,} target weights): {update * 1000:.1f} ms, "
        f"{update / (100 * dense):.2%} of training time at every=100.",
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
