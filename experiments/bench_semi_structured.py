"""2:4 semi-structured inference on a CUDA GPU: dense ``nn.Linear`` against ``sparsetrain.export.to_semi_structured``.

MLPs of ViT-B's shape (768-3072-768) and 1024-4096-4096-1024 in bf16, every Linear weight pruned to 2:4
along its inputs (``export.n_m_mask``: the 2 largest of every 4), forward under ``inference_mode`` at
several numbers of rows (tokens). Times from CUDA events, median of ``--repeats`` after warm-up; the
speed-up is dense / 2:4. The outputs are compared (bf16 tolerance) on every row.

    python experiments/bench_semi_structured.py [--out experiments/results/gpu]

Writes ``<out>/semi_structured_inference.{md,csv}``. Needs CUDA with compute capability >= 8.0.
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from sparsetrain.export import n_m_mask, to_semi_structured

RESULTS = Path(__file__).parent / "results" / "gpu"
MODELS = {"vitb_mlp": (768, 3072, 768), "mlp4096": (1024, 4096, 4096, 1024)}
ROWS = (512, 4096, 16384)


def mlp(dims) -> nn.Module:
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [nn.Linear(a, b)] + ([nn.GELU()] if i < len(dims) - 2 else [])
    return nn.Sequential(*layers)


def cuda_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_semi_structured: no CUDA device here")
    warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor.*")
    rows = []
    for name, dims in MODELS.items():
        torch.manual_seed(0)
        dense = mlp(dims).to("cuda", torch.bfloat16).eval()
        with torch.no_grad():
            for m in dense.modules():
                if isinstance(m, nn.Linear):
                    m.weight.mul_(n_m_mask(m.weight, 2, 4))
        report: dict = {}
        sparse = to_semi_structured(copy.deepcopy(dense), report)
        for n in ROWS:
            x = torch.randn(n, dims[0], device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                same = torch.allclose(dense(x).float(), sparse(x).float(), rtol=2e-2, atol=2e-1)
                dense_ms = cuda_ms(lambda model=dense, x=x: model(x), args.repeats)
                sparse_ms = cuda_ms(lambda model=sparse, x=x: model(x), args.repeats)
            rows.append({"model": name, "rows": n, "dense_ms": round(dense_ms, 4), "semi_structured_ms": round(sparse_ms, 4),
                         "speedup": round(dense_ms / sparse_ms, 3), "outputs_match": same,
                         "layers": ", ".join(f"{k}: {v}" for k, v in report.items())})  # fmt: skip
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "semi_structured_inference.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# 2:4 semi-structured inference (bf16)",
        "",
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}. Command: "
        f"`python experiments/bench_semi_structured.py {' '.join(sys.argv[1:])}`",
        "",
        "| model | rows | dense (ms) | 2:4 (ms) | speed-up | outputs match |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['rows']} | {r['dense_ms']} | {r['semi_structured_ms']} | {r['speedup']:.2f}x | "
              f"{r['outputs_match']} |" for r in rows]  # fmt: skip
    (args.out / "semi_structured_inference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
