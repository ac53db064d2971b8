"""Where to multiply the gradients by the masks on the masked path: three places, timed against a dense step.

Model: torchvision ResNet-18 (10 classes) on 32x32 inputs, batch 64, CPU, float32, SGD (lr 0.01,
momentum 0.9, weight decay 5e-4); every default target gets a random 90 % mask (weights zeroed there).
A step is forward, backward, the masking, the optimizer step and ``zero_grad``. Variants, each on its
own copy of the model:

* ``dense``: no masking (the reference);
* ``foreach``: today's path: after backward, one ``MaskKernel`` call (one fused ``torch._foreach_mul_``
  over all target gradients, uint8 masks, CPU chunks of ``CPU_CHUNK``), then ``torch.optim.SGD``;
* ``hooks``: :func:`sparsetrain.core.grad_masking.mask_grads_on_accumulate`: each target's gradient is
  multiplied by its mask in its ``register_post_accumulate_grad_hook``, right after autograd wrote it
  (while it may still be in cache), then ``torch.optim.SGD``;
* ``folded``: no separate pass: the mask is applied inside the optimizer's own foreach update
  (:func:`sparsetrain.core.grad_masking.masked_sgd_step`: ``buf = momentum * buf + mask * grad + wd * w``,
  ``w -= lr * buf``, with ``torch._foreach_addcmul_``), against ``sgd_foreach``, the same hand-written
  foreach update without the mask, so that the comparison isolates the fold (``torch.optim.SGD`` on the
  CPU runs a per-tensor loop, not foreach).

Whole-step ratios vs ``dense`` are paired per round (``timing.paired_rounds``, rotated order), median over
rounds with a 95 % bootstrap interval. The masking work itself is also timed directly (``perf_counter``
around the ``MaskKernel`` call; summed inside the hooks), median per step. The fold is a difference of
two whole updates, so it is measured on its own: the update alone (no forward, backward), plain vs one
``MaskKernel`` pass + plain vs folded, paired per round over ``--update-rounds`` rounds. Whole-step differences of
about 1 % are at the noise floor of a shared machine; the direct timings are the sharper instrument.

    python experiments/bench_grad_masking.py [--threads 1,2] [--rounds 9] [--steps 4]

Writes ``<out>/bench_grad_masking.{md,csv}`` (default experiments/results/).
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from bench_overhead import median_ci  # noqa: E402
from timing import paired_rounds  # noqa: E402

from sparsetrain.core import select_targets  # noqa: E402
from sparsetrain.core.grad_masking import mask_grads_on_accumulate, masked_sgd_step  # noqa: E402
from sparsetrain.core.kernels import MaskKernel  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("dense", "foreach", "hooks", "sgd_foreach", "folded")
LR, MOMENTUM, WD = 0.01, 0.9, 5e-4


class Variant:
    def __init__(self, kind: str, base, masks: dict, batch):
        self.kind, self.batch = kind, batch
        self.model = copy.deepcopy(base)
        self.targets = select_targets(self.model)
        self.masks = [masks[n] for n in self.targets]
        self.params = list(self.model.parameters())
        self.mask_s: list[float] = []  # masking time per step (direct)
        self._acc = 0.0
        self.kernel = MaskKernel("eager")
        if kind in ("dense", "foreach", "hooks"):
            self.opt = torch.optim.SGD(self.params, lr=LR, momentum=MOMENTUM, weight_decay=WD)
        else:
            self.bufs = [torch.zeros_like(p) for p in self.params]
            by_id = {id(p): m for p, m in zip(self.targets.values(), self.masks)}
            self.step_masks = [by_id.get(id(p)) for p in self.params]  # None: not a target
        if kind == "hooks":
            self.handles = mask_grads_on_accumulate(self.targets, dict(zip(self.targets, self.masks)), timer=self._add)

    def _add(self, seconds: float) -> None:
        self._acc += seconds

    def step(self) -> None:
        x, y = self.batch
        F.cross_entropy(self.model(x), y).backward()
        if self.kind == "foreach":
            t0 = time.perf_counter()
            self.kernel([p.grad for p in self.targets.values()], self.masks)
            self._acc += time.perf_counter() - t0
        if self.kind in ("dense", "foreach", "hooks"):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            grads = [p.grad for p in self.params]
            masks = self.step_masks if self.kind == "folded" else [None] * len(self.params)
            t0 = time.perf_counter()
            masked_sgd_step(self.params, grads, self.bufs, masks, lr=LR, momentum=MOMENTUM, weight_decay=WD)
            self._acc += time.perf_counter() - t0  # the whole update: the fold's cost is folded - sgd_foreach
            for p in self.params:
                p.grad = None
        self.mask_s.append(self._acc)
        self._acc = 0.0


def update_only(base, masks: dict, threads: int, rounds: int) -> dict[str, float]:
    """The optimizer update alone, on ResNet-18's parameters with random gradients, paired per round (rotated):
    ``plain`` the foreach SGD update, ``pass`` one ``MaskKernel`` pass then that update, ``folded`` the update
    with the masks inside. Returns the medians over rounds of ``pass - plain`` and ``folded - plain`` (ms)."""
    torch.set_num_threads(threads)
    model = copy.deepcopy(base)
    targets = select_targets(model)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    by_id = {id(p): masks[n] for n, p in targets.items()}
    step_masks = [by_id.get(id(p)) for p in params]
    target_grads = [g for g, m in zip(grads, step_masks) if m is not None]
    target_masks = [m for m in step_masks if m is not None]
    kernel = MaskKernel("eager")

    def plain():
        masked_sgd_step(params, grads, bufs, [None] * len(params), lr=LR, momentum=MOMENTUM, weight_decay=WD)

    def separate():
        kernel(target_grads, target_masks)
        plain()

    def folded():
        masked_sgd_step(params, grads, bufs, step_masks, lr=LR, momentum=MOMENTUM, weight_decay=WD)

    per = paired_rounds({"plain": plain, "pass": separate, "folded": folded}, rounds, 3)
    return {
        "pass_ms": statistics.median(a - b for a, b in zip(per["pass"], per["plain"])) * 1000,
        "folded_ms": statistics.median(a - b for a, b in zip(per["folded"], per["plain"])) * 1000,
        "plain_ms": statistics.median(per["plain"]) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--update-rounds", type=int, default=40, help="rounds of the update-only comparison")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    targets = select_targets(base)
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=gen) >= 0.9 for n, p in targets.items()}
    with torch.no_grad():
        for n, p in targets.items():
            p.mul_(masks[n])
    n_weights = sum(p.numel() for p in targets.values())
    batch = (torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        runs = {v: Variant(v, base, masks, batch) for v in VARIANTS}
        for run in runs.values():
            run.step(), run.step()
            run.mask_s.clear()
        per_round = paired_rounds({v: r.step for v, r in runs.items()}, args.rounds, args.steps)
        dense = per_round["dense"]
        for v, run in runs.items():
            ratio, low, high = median_ci([s / d for s, d in zip(per_round[v], dense)])
            step_ms = statistics.median(per_round[v]) * 1000
            mask_ms = statistics.median(run.mask_s) * 1000 if v != "dense" else None
            rows.append({
                "threads": threads, "variant": v, "step_ms": round(step_ms, 2), "ratio_vs_dense": round(ratio, 4),
                "ci_low": round(low, 4), "ci_high": round(high, 4),
                "mask_ms": round(mask_ms, 3) if mask_ms is not None else "",
                "mask_share_of_dense_step": round(mask_ms / (statistics.median(dense) * 1000), 4) if mask_ms is not None else "",
                "ns_per_weight": round(mask_ms * 1e6 / n_weights, 3) if mask_ms is not None else "",
            })  # fmt: skip
            print(rows[-1], flush=True)
    updates = {t: update_only(base, masks, t, args.update_rounds) for t in [int(t) for t in args.threads.split(",")]}
    print(updates, flush=True)
    write(rows, updates, args.out, load_start, n_weights, "python experiments/bench_grad_masking.py " + " ".join(sys.argv[1:]))


def write(rows, updates: dict, out: Path, load_start: str, n_weights: int, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_grad_masking.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    load_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "# Gradient masking on the masked path: one foreach pass, per-gradient hooks, or folded into the optimizer",
        "",
        f"ResNet-18, 32x32, batch 64, CPU float32, {n_weights / 1e6:.1f} M target weights at 90 % sparsity. "
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"load average {load_start} at the start, {load_end} at the end (shared machine). Command: `{command}`",
        "",
        "| threads | variant | median step (ms) | step / dense [95 % CI] | timed directly (ms per step) "
        "| that / dense step | ns per target weight |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = f"{r['mask_share_of_dense_step']:.2%}" if r["mask_share_of_dense_step"] != "" else "–"
        lines.append(
            f"| {r['threads']} | {r['variant']} | {r['step_ms']:.1f} | {r['ratio_vs_dense']:.3f} [{r['ci_low']:.3f}, "
            f"{r['ci_high']:.3f}] | {r['mask_ms'] if r['mask_ms'] != '' else '–'} | {share} | {r['ns_per_weight'] or '–'} |"
        )
    lines += [
        "",
        "Timed directly: `foreach` the `MaskKernel` call, `hooks` the sum of the hooks, `sgd_foreach` and `folded` the "
        "whole optimizer update (`masked_sgd_step` without and with the masks inside it): the fold costs the "
        "difference of those two. Compare `sgd_foreach` and `folded` with each other, not with `torch.optim.SGD`'s "
        "per-tensor loop.",
    ]
    lines += [
        "",
        "The optimizer update alone (no forward or backward; ResNet-18's parameters, random gradients, 3 updates per "
        "variant per round, rounds rotated; medians over rounds of the paired differences against the plain foreach "
        "SGD update):",
        "",
        "| threads | plain foreach SGD update (ms) | + one MaskKernel pass (ms) | mask folded into the update (ms) |",
        "|---|---|---|---|",
    ]
    for threads, u in updates.items():
        lines.append(f"| {threads} | {u['plain_ms']:.2f} | +{u['pass_ms']:.2f} | {u['folded_ms']:+.2f} |")
    lines.append("")
    for threads in sorted({r["threads"] for r in rows}):
        by = {r["variant"]: r for r in rows if r["threads"] == threads}
        dense_ms = by["dense"]["step_ms"]
        u = updates[threads]
        lines.append(
            f"- {threads} thread(s): masking costs {by['foreach']['mask_ms']:.2f} ms per step as one foreach pass "
            f"({by['foreach']['mask_ms'] / dense_ms:.2%} of the dense step; {u['pass_ms']:.2f} ms in the update-only "
            f"comparison), {by['hooks']['mask_ms']:.2f} ms in post-accumulate hooks ({by['hooks']['mask_ms'] / dense_ms:.2%}), "
            f"{u['folded_ms']:.2f} ms folded into the optimizer's update ({u['folded_ms'] / dense_ms:.2%})."
        )
    (out / "bench_grad_masking.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
