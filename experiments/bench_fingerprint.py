"""Cost of fingerprinting the masks for the cross-rank check: the old linear scheme against
``sparsetrain.core.fingerprint.mask_hashes``, in ns per weight, on the CPU.

The masks have the shapes of torchvision ResNet-50's prunable weights (the default targets:
54 convolutions and the classifier, 25.5 M weights), random at densities 0.1 and 0.5 (the
old scheme's cost grows with the number of kept weights; the new one's does not). Each time
is the median of ``--repeats`` calls (the cases interleaved) after three warm-up calls, wall clock. Usage::

    python experiments/bench_fingerprint.py                # writes experiments/results/bench_fingerprint.md
    python experiments/bench_fingerprint.py --threads 2 --out /tmp/fp
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

from sparsetrain.core.fingerprint import mask_hashes
from sparsetrain.core.targets import select_targets

RESULTS = Path(__file__).parent / "results"


def old_fingerprint(mask: torch.Tensor) -> torch.Tensor:
    """``sparsetrain/callback.py::_fingerprint`` before the new module (copied verbatim)."""
    positions = mask.reshape(-1).nonzero().squeeze(1)
    return torch.stack([positions.numel() * torch.ones((), dtype=torch.int64, device=mask.device),
                        (positions * 2654435761 % 2147483647).sum()])


def old_hashes(masks):
    return torch.stack([old_fingerprint(m) for m in masks])


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = torchvision.models.resnet50()
    shapes = [p.shape for p in select_targets(model).values()]
    numel = sum(s.numel() for s in shapes)
    g = torch.Generator().manual_seed(0)
    densities = (0.1, 0.5)
    cases = {}
    for density in densities:
        masks = [torch.rand(s, generator=g) < density for s in shapes]
        cases[density, "old"] = lambda masks=masks: old_hashes(masks)
        cases[density, "new"] = lambda masks=masks: mask_hashes(masks)
    for fn in cases.values():  # warm-up: the allocator's first large blocks, the clock
        for _ in range(3):
            fn()
    times = {key: [] for key in cases}
    for _ in range(args.repeats):  # interleaved, so that every case sees the same load
        for key, fn in cases.items():
            times[key].append(timed(fn))
    rows = []
    for density in densities:
        old, new = (statistics.median(times[density, k]) for k in ("old", "new"))
        rows.append((density, old, new))
        print(f"density {density}: old {old * 1e3:.1f} ms, new {new * 1e3:.1f} ms", file=sys.stderr)

    lines = [
        "# Mask fingerprint for the cross-rank check: old vs new",
        "",
        f"CPU ({platform.machine()}, {args.threads} thread(s), torch {torch.__version__}), a machine shared with other "
        f"jobs; medians of {args.repeats} interleaved calls after 3 warm-up calls each, wall clock. Masks with the shapes of torchvision "
        f"ResNet-50's default targets ({len(shapes)} tensors, {numel / 1e6:.1f} M weights), random at the density given.",
        "",
        "| density | old: nonzero + linear sum (ms) | old (ns/weight) | new: mask_hashes (ms) | new (ns/weight) | new / old |",
        "|---|---|---|---|---|---|",
    ]
    for density, old, new in rows:
        lines.append(
            f"| {density} | {old * 1e3:.1f} | {old / numel * 1e9:.2f} | {new * 1e3:.1f} | {new / numel * 1e9:.2f} "
            f"| {new / old:.2f} |"
        )
    lines += [
        "",
        "old: `positions = mask.nonzero()`, then `sum(positions * 2654435761 % 2147483647)` and the count: linear in "
        "the positions ({0, 3} and {1, 2} collide) and a `nonzero` (a host synchronisation on CUDA) per layer. "
        "new: `sparsetrain.core.fingerprint.mask_hashes`: the mask's bytes viewed as int64 words, gathered into "
        "64-bit blocks, a murmur3 fmix64 of each block xor its mixed index, summed mod 2^64; no nonzero, no synchronisation.",
        "",
        "Command:",
        "",
        "```bash",
        f"python experiments/bench_fingerprint.py --threads {args.threads}",
        "```",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_fingerprint.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
