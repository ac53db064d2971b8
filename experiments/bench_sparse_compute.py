"""Whole training steps on sparse kernels against the masked dense path, in one process.

A step is forward, backward, the gradient masking, an SGD step (momentum 0.9) and ``zero_grad``, on
random data. Every prunable target (``select_targets``) gets a random mask with the layer's exact
share kept (uniform sparsity), and its weight is zeroed there. Variants, each on its own copy of the
same model, masks and optimizer:

* ``masked``: today's path: dense forward and backward, then one fused ``foreach`` multiply of all
  target gradients by their masks (``MaskKernel``, as the callback does), then the step;
* ``sparse``: :class:`sparsetrain.core.sparse.SparseCompute` (``mode="sparse"``) on every target it takes
  (CSR on the CPU; on CUDA 2:4 where the masks are 2:4); the targets it refuses (ViT's patch-embedding
  convolution) keep the masked path's multiply;
* ``auto``: ``mode="auto"``: each layer on whichever of masked and sparse it measured faster at its first
  step (that timing is excluded from the step times and reported as ``calibration_s``);
* on CUDA also ``csr`` and ``2:4``: ``mode="sparse"`` with only that kernel.

Timing: per (model, threads, sparsity), after ``WARMUP`` steps of each variant, ``--rounds`` rounds each
run every variant ``--steps`` times in rotated order (``timing.paired_rounds``); a round gives each
variant's median step, the speed-up is masked / variant per round, and the table gives its median over
rounds with a 95 % bootstrap interval. Peak memory: one more step per variant on one thread, the highest
live tensor bytes (parameters, optimizer state, masks, patterns and gradient buffers included; on the CPU
counted op by op with ``timing.LiveBytes``, on CUDA ``torch.cuda.max_memory_allocated``); the ratio is
variant / masked.

Models: ``mlp4096`` 1024-4096-4096-1024 (batch 256), ``vitb_mlp`` 768-3072-768 (batch 512, a ViT-B MLP),
``lenet`` 784-300-100-10 (batch 256), all ``nn.Sequential`` with GELU between layers and cross-entropy on the
last (the sparse layers are linked: ``sparsetrain.core.sparse.chains``; ``<name>_unlinked``, not in the default
run, is the same MLP called from a forward of its own, where every layer returns the row-major layout);
``vit_s`` timm ``vit_small_patch16_224`` at 224x224 (batch 16, 1000 classes); ``gpt2_block`` one Hugging
Face ``GPT2Block`` of GPT-2 small's shape (768 wide, 12 heads, MLP 3072, its four ``Conv1D`` layers) on
sequences of 256 (batch 4), mean-square loss. CPU runs are float32; ``--device cuda`` runs under bf16
autocast (``--bf16``: also on the CPU), ``--structure 2:4`` gives 2:4 masks (50 %).

    python experiments/bench_sparse_compute.py                          # the CPU table (about 30 min on 2 idle cores)
    python experiments/bench_sparse_compute.py --models mlp4096,vitb_mlp --threads 1 --sparsities 0.95,0.98
    python experiments/bench_sparse_compute.py --device cuda --models vitb_mlp --structure 2:4 --out experiments/results/gpu

Writes ``<out>/bench_sparse_compute[_<device>][_2of4][_bf16].{md,csv}`` and ``.png`` (default experiments/results/).
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
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_overhead import median_ci  # noqa: E402
from timing import LiveBytes, paired_rounds, storage_bytes  # noqa: E402

from sparsetrain.core import select_targets  # noqa: E402
from sparsetrain.core.kernels import MaskKernel  # noqa: E402
from sparsetrain.core.sparse import SparseCompute, refusals  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODELS = ("mlp4096", "vitb_mlp", "lenet", "vit_s", "gpt2_block")
SPARSITIES = (0.8, 0.9, 0.95, 0.98)
WARMUP = 2
# rounds x steps per model on the CPU (a ViT-S step takes seconds, a LeNet step milliseconds)
SCHEDULE = {"mlp4096": (5, 3), "vitb_mlp": (5, 4), "lenet": (7, 20), "vit_s": (3, 1), "gpt2_block": (5, 3)}
SCHEDULE.update({f"{m}_unlinked": SCHEDULE[m] for m in ("mlp4096", "vitb_mlp", "lenet")})
MASK_KERNEL = MaskKernel("eager")
warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor.*prototype.*")


def mlp(dims) -> nn.Sequential:
    """Linear layers with GELU between, as an ``nn.Sequential``: the sparse layers are linked (each hands its
    output to the next in the CSR layout, ``sparsetrain.core.sparse.chains``)."""
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])


class UnlinkedMLP(nn.Module):
    """The same layers called from a forward of its own: no links (every layer returns nn.Linear's row-major layout)."""

    def __init__(self, dims):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x


def build(name: str, device: str) -> tuple[nn.Module, tuple, callable]:
    """The model, one batch, and the loss of a forward on it."""
    torch.manual_seed(0)
    ce = lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])  # noqa: E731
    if name.removesuffix("_unlinked") in ("mlp4096", "vitb_mlp", "lenet"):
        dims, batch = {"mlp4096": ((1024, 4096, 4096, 1024), 256), "vitb_mlp": ((768, 3072, 768), 512),
                       "lenet": ((784, 300, 100, 10), 256)}[name.removesuffix("_unlinked")]  # fmt: skip
        model = UnlinkedMLP(dims) if name.endswith("_unlinked") else mlp(dims)
        data, loss = (torch.randn(batch, dims[0]), torch.randint(0, dims[-1], (batch,))), ce
    elif name == "vit_s":
        import timm

        model = timm.create_model("vit_small_patch16_224", num_classes=1000)
        data, loss = (torch.randn(16, 3, 224, 224), torch.randint(0, 1000, (16,))), ce
    elif name == "gpt2_block":
        from transformers import GPT2Config
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        config = GPT2Config(n_embd=768, n_head=12, n_positions=256, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        config._attn_implementation = "sdpa"
        model = GPT2Block(config)
        data = (torch.randn(4, 256, 768),)
        loss = lambda model, batch: model(batch[0]).float().square().mean()  # noqa: E731
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)} (an MLP's name + '_unlinked': its layers without links)")
    return model.to(device), tuple(t.to(device) for t in data), loss


def random_masks(targets: dict, sparsity: float, structure: str | None, transposed: set[str], seed: int = 0) -> dict:
    """Random masks keeping ``round((1 - sparsity) * n)`` of each target; ``structure="2:4"``: 2 random of every 4
    consecutive inputs of each output (``transposed``: targets stored ``(in, out)``, HF ``Conv1D``)."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in targets.items():
        if structure == "2:4":
            rows = p.detach().t() if name in transposed else p.detach()
            scores = torch.rand(rows.shape, generator=gen).reshape(rows.shape[0], -1, 4)
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, dim=-1).indices, True)
            keep = keep.reshape(rows.shape)
            masks[name] = (keep.t() if name in transposed else keep).contiguous().to(p.device)
        else:
            keep = round((1 - sparsity) * p.numel())
            order = torch.randperm(p.numel(), generator=gen)[:keep]
            masks[name] = torch.zeros(p.numel(), dtype=torch.bool).index_fill_(0, order, True).view(p.shape).to(p.device)
    return masks


class Variant:
    """One way of training the model: its own copy, optimizer and (for sparse ones) SparseCompute."""

    def __init__(self, kind: str, base: nn.Module, masks: dict, batch: tuple, loss_fn, device: str, bf16: bool):
        self.kind, self.batch, self.loss_fn, self.device, self.bf16 = kind, batch, loss_fn, device, bf16
        self.model = copy.deepcopy(base)
        targets = select_targets(self.model)
        self.params, self.masks = targets, masks
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.compute = None
        if kind != "masked":
            mode = "auto" if kind == "auto" else "sparse"
            kernels = {"csr": ("csr",), "2:4": ("2:4",)}.get(kind, ("csr", "2:4"))
            refused = refusals(self.model, targets) if mode == "sparse" else {}
            taken = {n: p for n, p in targets.items() if n not in refused}
            self.compute = SparseCompute(self.model, taken, {n: masks[n] for n in taken}, mode=mode, kernels=kernels)
            self.untaken = [n for n in targets if n in refused]
        self.first_step_s = None

    def to_mask(self) -> list[str]:
        if self.compute is None:
            return list(self.params)
        return self.compute.grads_to_mask() + self.untaken

    def step(self) -> None:
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn(self.model, self.batch)
        loss.backward()
        names = self.to_mask()
        if names:
            MASK_KERNEL([self.params[n].grad for n in names], [self.masks[n] for n in names])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def resting_tensors(self) -> list:
        tensors = list(self.model.parameters()) + list(self.masks.values()) + list(self.batch)
        tensors += [t for state in self.opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        if self.compute is not None:
            for layer in self.compute.layers.values():
                p = layer.pattern
                if p is not None:
                    tensors += [p.crow, p.col, p.crow_t, p.col_t, p.perm, p.flat, p._grad_buffer]
                tensors.append(layer.mask)
        return tensors

    def peak_bytes(self) -> int:
        """Peak live tensor bytes of one step (after warm-up: optimizer state and buffers exist)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        resting = self.resting_tensors()
        with LiveBytes(resting) as live:
            self.step()
        return storage_bytes(resting) + live.peak

    def choices(self) -> str:
        if self.compute is None:
            return ""
        table = self.compute.table()
        sparse = sum(r["choice"] in ("csr", "2:4") for r in table)
        return f"{sparse}/{len(table)} sparse"


def bench_one(model_name: str, sparsity: float, threads: int, variants: list[str], device: str, structure: str | None,
              rounds: int, steps: int, memory: bool, bf16: bool) -> list[dict]:  # fmt: skip
    torch.set_num_threads(threads)
    base, batch, loss_fn = build(model_name, device)
    targets = select_targets(base)
    conv1d = {f"{n}.weight" for n, m in base.named_modules() if any(c.__name__ == "Conv1D" for c in type(m).__mro__)}
    masks = random_masks(targets, sparsity, structure, conv1d)
    with torch.no_grad():
        for n, p in targets.items():
            p.mul_(masks[n])
    runs = {v: Variant(v, base, masks, batch, loss_fn, device, bf16) for v in variants}
    for run in runs.values():
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        run.step()
        sync()
        run.first_step_s = time.perf_counter() - t0
        for _ in range(WARMUP - 1):
            run.step()
    per_round = paired_rounds({v: r.step for v, r in runs.items()}, rounds, steps, cuda=device == "cuda")
    peaks = {}
    if memory:
        torch.set_num_threads(1)
        peaks = {v: r.peak_bytes() for v, r in runs.items()}
        torch.set_num_threads(threads)
    rows = []
    masked_rounds = per_round["masked"]
    for v, run in runs.items():
        ratios = [m / s for m, s in zip(masked_rounds, per_round[v])]
        speedup, low, high = median_ci(ratios)
        step_s = statistics.median(per_round[v])
        rows.append({
            "model": model_name, "device": device, "dtype": "bf16 autocast" if bf16 else "float32", "threads": threads, "sparsity": sparsity, "structure": structure or "",
            "variant": v, "step_ms": round(step_s * 1000, 2), "speedup": round(speedup, 3), "ci_low": round(low, 3),
            "ci_high": round(high, 3), "peak_mb": round(peaks[v] / 2**20, 1) if v in peaks else "",
            "peak_ratio": round(peaks[v] / peaks["masked"], 3) if v in peaks else "",
            "choices": run.choices(),
            "calibration_s": round(max(run.first_step_s - step_s, 0.0), 2) if v == "auto" else "",
            "rounds": rounds, "steps": steps,
        })  # fmt: skip
        print(f"{model_name:10s} t={threads} s={sparsity:.2f} {v:6s} {step_s * 1000:9.1f} ms  x{speedup:.2f} [{low:.2f}, {high:.2f}]"
              f"  peak {rows[-1]['peak_ratio']} {rows[-1]['choices']}", flush=True)  # fmt: skip
    return rows


def load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def write(rows: list[dict], out: Path, name: str, command: str, load_start: str, load_end: str, device: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    machine = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    lines = [
        "# Whole training steps: sparse kernels vs the masked dense path",
        "",
        f"Machine: {machine}, {os.cpu_count()} CPUs, torch {torch.__version__}; load average (1, 5, 15 min) "
        f"{load_start} at the start, {load_end} at the end (the machine is shared: ratios are paired per round).",
        f"Command: `{command}`",
        "",
        "Speed-up: masked step time / variant step time, median over rounds of the per-round ratio [95 % bootstrap "
        "interval]. Peak memory: variant / masked, highest live tensor bytes in a step (weights, optimizer state, "
        "masks, patterns and gradient buffers included). `auto`: how many layers it ran sparse, and the one-off "
        "time its calibration added to the first step.",
        "",
        "| model | threads | sparsity | masked step (ms) | sparse speed-up | auto speed-up | auto layers | "
        "peak memory sparse / masked | auto calibration (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keyed = {(r["model"], r["threads"], r["sparsity"], r["variant"]): r for r in rows}
    for (model, threads, sparsity, variant), r in keyed.items():
        if variant != "masked":
            continue
        cells = []
        for v in ("sparse", "auto"):
            x = keyed.get((model, threads, sparsity, v))
            cells.append(f"{x['speedup']:.2f}x [{x['ci_low']:.2f}, {x['ci_high']:.2f}]" if x else "–")
        auto = keyed.get((model, threads, sparsity, "auto"))
        sparse = keyed.get((model, threads, sparsity, "sparse"))
        mem = f"{sparse['peak_ratio']:.2f}" if sparse and sparse["peak_ratio"] != "" else "–"
        lines.append(
            f"| {model} | {threads} | {sparsity:.0%} | {r['step_ms']:.1f} | {cells[0]} | {cells[1]} | "
            f"{auto['choices'] if auto else '–'} | {mem} | {auto['calibration_s'] if auto else '–'} |"
        )
    extra = sorted({r["variant"] for r in rows} - {"masked", "sparse", "auto"})
    if extra:
        lines += ["", "| model | threads | sparsity | variant | step (ms) | speed-up vs masked | peak memory / masked |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            if r["variant"] in extra:
                masks = r["structure"] or f"{r['sparsity']:.0%}"
                lines.append(f"| {r['model']} | {r['threads']} | {masks} | {r['variant']} | {r['step_ms']:.1f} "
                             f"| {r['speedup']:.2f}x [{r['ci_low']:.2f}, {r['ci_high']:.2f}] | {r['peak_ratio']} |")  # fmt: skip
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.2), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        for variant, style in (("sparse", "-"), ("auto", "--")):
            for threads in sorted({r["threads"] for r in rows}):
                pts = [(r["sparsity"], r["speedup"]) for r in rows
                       if r["model"] == model and r["variant"] == variant and r["threads"] == threads]  # fmt: skip
                if pts:
                    ax.plot(*zip(*sorted(pts)), style, marker="o", label=f"{variant}, {threads} thr")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(model)
        ax.set_xlabel("sparsity")
    axes[0][0].set_ylabel("speed-up vs masked (whole step)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--structure", default=None, choices=[None, "2:4"], help="2:4 masks (sparsity 50 %%)")
    parser.add_argument("--variants", default=None, help="default: masked,sparse,auto (cpu); masked,csr,2:4,auto (cuda)")
    parser.add_argument("--rounds", type=int, default=None, help="default: per model (SCHEDULE)")
    parser.add_argument("--steps", type=int, default=None, help="steps per variant per round; default: per model")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU too (always on CUDA)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    variants = (args.variants or ("masked,csr,2:4,auto" if args.device == "cuda" else "masked,sparse,auto")).split(",")
    if args.structure != "2:4":
        variants = [v for v in variants if v != "2:4"]
    sparsities = [0.5] if args.structure == "2:4" else [float(s) for s in args.sparsities.split(",")]
    load_start, rows = load(), []
    for model in args.models.split(","):
        rounds, steps = SCHEDULE.get(model, (5, 3))
        for threads in [int(t) for t in args.threads.split(",")]:
            for sparsity in sparsities:
                rows += bench_one(model, sparsity, threads, variants, args.device, args.structure,
                                  args.rounds or rounds, args.steps or steps, memory=not args.no_memory and threads == 1,
                                  bf16=args.bf16 or args.device == "cuda")  # fmt: skip
    name = "bench_sparse_compute" + ("" if args.device == "cpu" else f"_{args.device}") + ("_2of4" if args.structure else "")
    name += "_bf16" if args.bf16 and args.device == "cpu" else ""
    command = "python experiments/bench_sparse_compute.py " + " ".join(sys.argv[1:])
    write(rows, args.out, name, command.strip(), load_start, load(), args.device)
    plot(rows, args.out / f"{name}.png")


if __name__ == "__main__":
    main()
