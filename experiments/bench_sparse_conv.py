"""Could convolutions train on the CSR kernels? im2col and channels-last-as-a-matmul against dense convolution.

For convolution shapes of ResNet-18 (CIFAR, 32x32, batch 64) and ResNet-50 (224x224, batch 32), one
forward plus backward (input and weight gradients) of:

* ``dense``: ``F.conv2d`` (oneDNN), then the weight gradient multiplied by the mask (the masked path);
* ``im2col``: ``F.unfold`` the input to ``(rows, C*k*k)``, :func:`sparsetrain.core.sparse.csr_linear` with the
  ``(out, C*k*k)`` weight and its mask pattern, back to ``NCHW``; the input gradient goes back through
  ``F.fold`` (autograd of ``unfold``);
* ``channels_last`` (1x1 convolutions only): what ``SparseCompute`` runs for a pointwise ``Conv2d``
  (:func:`sparsetrain.core.sparse.linear.csr_conv1x1`): the channels-last input viewed as ``(rows, C)``
  without a copy, ``csr_linear``, the result made channels-last like ``F.conv2d``'s; against ``F.conv2d``
  on the same channels-last tensors.

Median of ``--repeats`` paired, alternating runs; ``speed-up`` is dense / sparse. Random masks at each
sparsity; float32.

    python experiments/bench_sparse_conv.py [--threads 1] [--repeats 5]

Writes ``<out>/bench_sparse_conv.{md,csv}`` (default experiments/results/).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsetrain.core.kernels import MaskKernel
from sparsetrain.core.sparse import SparsePattern, csr_linear
from sparsetrain.core.sparse.linear import csr_conv1x1

RESULTS = Path(__file__).parent / "results"
# (label, batch, in channels, out channels, kernel, spatial size)
SHAPES = [
    ("resnet18-cifar layer1 3x3", 64, 64, 64, 3, 32),
    ("resnet18-cifar layer3 3x3", 64, 256, 256, 3, 8),
    ("resnet18-cifar layer4 3x3", 64, 512, 512, 3, 4),
    ("resnet50-224 layer3 3x3", 32, 256, 256, 3, 14),
    ("resnet50-224 layer3 1x1 in", 32, 1024, 256, 1, 14),
    ("resnet50-224 layer3 1x1 out", 32, 256, 1024, 1, 14),
]
SPARSITIES = (0.9, 0.95, 0.98)
MASK_KERNEL = MaskKernel("eager")


def time_pair(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times = {n: [] for n in fns}
    names = list(fns)
    for r in range(repeats):
        for n in names[r % 2 :] + names[: r % 2]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) * 1000 for n, t in times.items()}


def bench(label, batch, c_in, c_out, k, size, sparsity, repeats) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(c_out, c_in, k, k, generator=gen) >= sparsity
    weight = (torch.randn(c_out, c_in, k, k, generator=gen) * mask).requires_grad_()
    x = torch.randn(batch, c_in, size, size, generator=gen).requires_grad_()
    pad = k // 2
    dy = torch.randn(batch, c_out, size, size, generator=gen)
    mask_bytes = [mask.view(torch.uint8)]

    def dense():
        gx, gw = torch.autograd.grad(F.conv2d(x, weight, padding=pad), [x, weight], dy)
        MASK_KERNEL([gw], mask_bytes)

    w2 = weight.detach().view(c_out, -1).requires_grad_()
    pattern = SparsePattern(mask.view(c_out, -1))

    def im2col():
        cols = F.unfold(x, k, padding=pad).transpose(1, 2)  # (batch, size*size, c_in*k*k)
        y = csr_linear(cols, w2, None, pattern).transpose(1, 2).reshape(batch, c_out, size, size)
        torch.autograd.grad(y, [x, w2], dy)

    runs = {"dense": dense, "im2col": im2col}
    if k == 1:
        x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        dy_cl = dy.to(memory_format=torch.channels_last)

        def dense_cl():
            gx, gw = torch.autograd.grad(F.conv2d(x_cl, weight, padding=0), [x_cl, weight], dy_cl)
            MASK_KERNEL([gw], mask_bytes)

        pattern4 = SparsePattern(mask)  # the (out, in, 1, 1) weight itself, as SparseCompute runs it

        def channels_last():
            y = csr_conv1x1(x_cl, weight, None, pattern4)  # csr_linear on the NHWC view, result channels-last
            torch.autograd.grad(y, [x_cl, weight], dy_cl)

        runs.update(dense_channels_last=dense_cl, channels_last=channels_last)
    times = {}
    times.update(time_pair({"dense": runs["dense"], "im2col": runs["im2col"]}, repeats))
    if k == 1:
        times.update(time_pair({"dense_channels_last": runs["dense_channels_last"], "channels_last": runs["channels_last"]}, repeats))
    rows = []
    for name in ("im2col", "channels_last"):
        if name in times:
            base = times["dense" if name == "im2col" else "dense_channels_last"]
            rows.append({"shape": label, "batch": batch, "c_in": c_in, "c_out": c_out, "kernel": k, "size": size,
                         "sparsity": sparsity, "method": name, "dense_ms": round(base, 2), "sparse_ms": round(times[name], 2),
                         "speedup": round(base / times[name], 3)})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = [r for shape in SHAPES for s in SPARSITIES for r in bench(*shape, s, args.repeats)]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench_sparse_conv.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    load_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "# Convolutions on CSR kernels: forward + backward against dense convolution",
        "",
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, float32; load "
        f"average {load_start} at the start, {load_end} at the end. Command: "
        f"`python experiments/bench_sparse_conv.py {' '.join(sys.argv[1:])}`",
        "",
        "| layer | batch | sparsity | method | dense (ms) | sparse (ms) | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['shape']} | {r['batch']} | {r['sparsity']:.0%} | {r['method']} | {r['dense_ms']} | {r['sparse_ms']} | "
              f"{r['speedup']:.2f}x |" for r in rows]  # fmt: skip
    (args.out / "bench_sparse_conv.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
