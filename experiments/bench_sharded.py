"""Sharded masks (FSDP2 layout): memory per rank and communication per mask update, measured.

    python experiments/bench_sharded.py                  # W = 1, 2, 4 gloo processes; writes results/bench_sharded.md
    python experiments/bench_sharded.py --worlds 1 2     # fewer world sizes

The 54 prunable weights of ResNet-50 (25.5 M), cut as FSDP2 cuts them (``torch.chunk`` rows, rank r gets
chunk r), the weights and gradients drawn from a fixed seed so every world size sees the same numbers. Every
rank runs the methods on its pieces exactly as ``SparsityCallback`` does under ``ModelParallelStrategy``
(``SparsityContext(shards=...)``) and counts what it puts into collectives (``Shards.bytes_sent``). Measured
per rank: bool mask bytes (and bit-packed, as checkpointed), bytes sent and collectives per update of each
method, the update's wall time, and the per-step mask multiply over the local pieces. The alternative that
gathers the scores instead sends the rank's ``4 P / W`` bytes of fp32 scores (and receives ``4 P (W-1) / W``).
W = 1 is the unsharded path (no collectives). Timings with W > 1 processes on a 2-core machine include the
processes competing for the cores; bytes and collective counts are exact and do not depend on the machine.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsetrain.core.kernels import MaskKernel  # noqa: E402
from sparsetrain.core.shards import Piece, Shards, pack_rows  # noqa: E402
from sparsetrain.methods import GMP, RigL, SET, Static  # noqa: E402
from sparsetrain.methods.base import SparsityContext  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOTAL = 1000


def resnet50_shapes() -> dict[str, tuple[int, ...]]:
    import torchvision

    model = torchvision.models.resnet50()
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.dim() > 1}


def rows(n: int, rank: int, world: int) -> tuple[int, int]:
    size = -(-n // world)
    start = min(rank * size, n)
    return start, min(start + size, n)


def methods():
    return {
        "Static init (ERK 90 %)": (Static(0.9, "erk"), "init"),
        "GMP per-layer top-k (90 %)": (GMP(0.9, distribution="uniform", start=0, end=500, every=100), "update"),
        "GMP global threshold (90 %)": (GMP(0.9, distribution="global", start=0, end=500, every=100), "update"),
        "RigL drop/grow (ERK 90 %)": (RigL(0.9, every=100, end=750), "update"),
        "SET drop/grow (ERK 90 %)": (SET(0.9, every=100, end=750), "update"),
    }


def worker(rank, world, port, shapes, queue):
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    weights, grads = {}, {}
    for n, s in shapes.items():  # the same whole tensors on every world size; keep this rank's rows
        a, b = rows(s[0], rank, world)
        weights[n] = torch.randn(s, generator=g)[a:b].clone()
        grads[n] = torch.randn(s, generator=g)[a:b].clone()
    shards = Shards({n: Piece(s, *rows(s[0], rank, world)) for n, s in shapes.items()}) if world > 1 else None
    results = {}
    for label, (method, what) in methods().items():
        method.setup(TOTAL)
        ctx = SparsityContext(weights, None, TOTAL, torch.Generator().manual_seed(1), shards=shards)
        masks = method.init_masks(ctx) if what == "update" else None
        times, sent, calls = [], 0, 0
        for _ in range(3):
            before = (shards.bytes_sent, shards.collectives) if shards else (0, 0)
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            if what == "init":
                out = method.init_masks(ctx)
            else:
                out = method.update(SparsityContext(weights, masks, TOTAL, torch.Generator().manual_seed(2), shards=shards), 100, grads)
            times.append(time.perf_counter() - t0)
            if shards:
                sent, calls = shards.bytes_sent - before[0], shards.collectives - before[1]
        results[label] = {"ms": 1e3 * statistics.median(times), "sent": sent, "calls": calls}
    masks = out
    kernel = MaskKernel("eager")
    step = []
    for _ in range(5):
        t0 = time.perf_counter()
        kernel(list(grads.values()), list(masks.values()))
        step.append(time.perf_counter() - t0)
    local_weights = sum(w.numel() for w in weights.values())
    queue.put((rank, {
        "updates": results,
        "mask_bytes": sum(m.numel() * m.element_size() for m in masks.values()),
        "packed_bytes": sum(pack_rows(m).numel() for m in masks.values()),
        "local_weights": local_weights,
        "step_ms": 1e3 * statistics.median(step),
    }))
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, shapes) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, shapes, queue)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    return got[0]  # rank 0 (the largest rows: torch.chunk gives the first ranks the extra row)


def human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    shapes = resnet50_shapes()
    total = sum(math.prod(s) for s in shapes.values())
    runs = {w: measure(w, shapes) for w in args.worlds}
    lines = [
        "# Sharded masks: memory and communication per rank (measured)",
        "",
        f"`python experiments/bench_sharded.py --worlds {' '.join(map(str, args.worlds))}`: ResNet-50's {len(shapes)} prunable "
        f"weights (P = {total:,}), cut in dim-0 pieces as FSDP2 does, on W gloo processes; rank 0's figures. Bytes and "
        "collectives are exact; times are medians of 3 on a 2-core CPU machine (W > 2 processes share 2 cores).",
        "",
        "| W | weights on rank 0 | mask bytes (bool) | checkpointed (bit-packed) | per-step mask multiply |",
        "|---|---|---|---|---|",
    ]
    for w, r in runs.items():
        lines.append(f"| {w} | {r['local_weights']:,} ({r['local_weights'] / total:.1%}) | {human(r['mask_bytes'])} | "
                     f"{human(r['packed_bytes'])} | {r['step_ms']:.1f} ms |")
    lines += ["", "Per mask update, sent by rank 0 (the scores' own size for comparison: gathering them instead sends "
              "4 P / W bytes and receives 4 P (W-1) / W):", "",
              "| method | W | sent | collectives | gather-the-scores alternative | time |", "|---|---|---|---|---|---|"]
    for label in methods():
        for w, r in runs.items():
            u = r["updates"][label]
            alt = "-" if w == 1 else f"{human(4 * total / w)} sent, {human(4 * total * (w - 1) / w)} received"
            lines.append(f"| {label} | {w} | {human(u['sent'])} | {u['calls']} | {alt} | {u['ms']:.0f} ms |")
    lines += ["", "Summary (the README's table):", "",
              "| W | masks per rank (bool / bit-packed in checkpoints) | sent per update: GMP per-layer / global / RigL "
              "| instead, gathering the fp32 scores: sent per rank |", "|---|---|---|---|"]
    for w, r in runs.items():
        u = r["updates"]
        sent = " / ".join(human(u[k]["sent"]) for k in ("GMP per-layer top-k (90 %)", "GMP global threshold (90 %)",
                                                         "RigL drop/grow (ERK 90 %)"))
        lines.append(f"| {w} | {human(r['mask_bytes'])} / {human(r['packed_bytes'])} | {sent} | "
                     f"{'-' if w == 1 else human(4 * total / w)} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_sharded.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
