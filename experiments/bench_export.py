"""Export on the CPU: compressed checkpoint size and CSR inference time vs sparsity.

Two models with random weights: timm ``vit_tiny_patch16_224`` and an MLP 1024-4096-4096-1024.
Every default target (``sparsetrain.core.select_targets``: Conv and Linear weights) is pruned by
magnitude per layer to the sparsity (one threshold per layer, ``kthvalue`` of ``|w|``).

1. Size: bytes of ``save_compressed`` (fp32 and bf16) vs ``torch.save(state_dict)``, per weight
   of the whole state dict and for the pruned targets alone (against the ideal
   ``(1 - s) * bytes_per_value + 1/8``); every round trip is checked with ``torch.equal``.
2. Per-layer time: every ``nn.Linear`` of each model, on its real input (captured from a forward
   at batch 1 and 32; ViT's layers see ``batch * 197`` rows), dense ``F.linear`` vs
   :class:`sparsetrain.export.SparseLinear` (CSR), median of repeats, under ``inference_mode``.
3. Whole model: dense forward vs all Linear layers CSR (``benchmark=False``) vs
   ``to_sparse_inference(benchmark=True, example_inputs=...)`` (CSR only where faster).

    python experiments/bench_export.py [--out DIR] [--threads 2]

Writes ``<out>/export_cpu.csv`` (long format: section, model, dtype, batch, sparsity, layer,
metric, value) and ``export_cpu.md`` (default experiments/results/).
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import platform
import time
from functools import partial
from pathlib import Path

import timm
import torch
from torch import nn

from sparsetrain.core import select_targets
from sparsetrain.export import SparseLinear, load_compressed, median_ms, save_compressed, to_sparse_inference

RESULTS = Path(__file__).parent / "results"
SIZE_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
TIME_SPARSITIES = (0.8, 0.9, 0.95, 0.98)
BATCHES = (1, 32)


class MLP(nn.Module):
    def __init__(self, dims=(1024, 4096, 4096, 1024)):
        super().__init__()
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers += [nn.Linear(a, b)] + ([nn.GELU()] if i < len(dims) - 2 else [])
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "vit_tiny":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    return MLP().eval()


def example(name: str, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 3, 224, 224, generator=g) if name == "vit_tiny" else torch.randn(batch, 1024, generator=g)


@torch.no_grad()
def prune_(weight: torch.Tensor, sparsity: float) -> None:
    """Zero the ``sparsity`` fraction of smallest |w| (per layer, in place)."""
    k = round(sparsity * weight.numel())
    if k:
        thr = weight.abs().reshape(-1).float().kthvalue(k).values
        weight.masked_fill_(weight.abs() <= thr, 0)


def pruned_copy(model: nn.Module, sparsity: float, linear_only: bool = False) -> nn.Module:
    m = copy.deepcopy(model)
    targets = {n: m.get_submodule(n).weight for n, mod in m.named_modules() if isinstance(mod, nn.Linear)} if linear_only \
        else select_targets(m)
    for w in targets.values():
        prune_(w, sparsity)
    return m


time_ms = partial(median_ms, min_s=5e-3)  # the library's timer, with longer inner loops


def nbytes(obj, compressed: bool) -> int:
    buf = io.BytesIO()
    if compressed:
        save_compressed(obj, buf)
    else:
        torch.save(obj, buf)
    return buf.getbuffer().nbytes


def size_rows(name: str, model: nn.Module) -> list[dict]:
    rows = []
    for dtype, bpv in ((torch.float32, 4), (torch.bfloat16, 2)):
        for s in SIZE_SPARSITIES:
            m = pruned_copy(model, s).to(dtype)
            sd = m.state_dict()
            targets = set(select_targets(m))
            numel = sum(v.numel() for v in sd.values())
            tnumel = sum(sd[n].numel() for n in targets)
            buf = io.BytesIO()
            t0 = time.perf_counter()
            save_compressed(sd, buf)
            save_s = time.perf_counter() - t0
            buf.seek(0)
            t0 = time.perf_counter()
            back = load_compressed(buf)
            load_s = time.perf_counter() - t0
            assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in sd.items()), "round trip"
            target_sd = {n: sd[n] for n in targets}
            row = dict(
                model=name, dtype=str(dtype).replace("torch.", ""), sparsity=s, weights=numel,
                dense_bytes=nbytes(sd, False), compressed_bytes=buf.getbuffer().nbytes,
                target_bytes_per_weight=nbytes(target_sd, True) / tnumel, ideal=(1 - s) * bpv + 1 / 8,
                save_s=save_s, load_s=load_s,
            )  # fmt: skip
            row["dense_bytes_per_weight"] = row["dense_bytes"] / numel
            row["bytes_per_weight"] = row["compressed_bytes"] / numel
            row["ratio"] = row["compressed_bytes"] / row["dense_bytes"]
            rows.append(row)
            print(f"size {name} {row['dtype']} s={s}: {row['bytes_per_weight']:.3f} B/weight (targets "
                  f"{row['target_bytes_per_weight']:.3f}, ideal {row['ideal']:.3f}), {row['ratio']:.3f} of dense", flush=True)
    return rows


def capture_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    got, handles = {}, []
    for n, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=n: got.setdefault(n, a[0].detach().clone())))
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return got


def layer_rows(name: str, model: nn.Module, repeats: int) -> list[dict]:
    rows = []
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for batch in BATCHES:
        inputs = capture_inputs(model, example(name, batch))
        dense = {}
        with torch.inference_mode():
            for n, lin in linears.items():
                dense[n] = time_ms(lambda f=lin, x=inputs[n]: f(x), repeats)
        for s in TIME_SPARSITIES:
            total_d = total_s = 0.0
            with torch.inference_mode():
                for n, lin in linears.items():
                    pl = copy.deepcopy(lin)
                    prune_(pl.weight, s)
                    sp = SparseLinear(pl)
                    x = inputs[n]
                    torch.testing.assert_close(sp(x), pl(x), rtol=1e-4, atol=1e-4)
                    t = time_ms(lambda f=sp, x=x: f(x), repeats)
                    rows.append(dict(model=name, batch=batch, sparsity=s, layer=n, shape=f"{lin.out_features}x{lin.in_features}",
                                     rows=x.reshape(-1, lin.in_features).shape[0], dense_ms=dense[n], csr_ms=t))
                    total_d += dense[n]
                    total_s += t
            rows.append(dict(model=name, batch=batch, sparsity=s, layer="all Linear", shape="", rows="", dense_ms=total_d, csr_ms=total_s))
            print(f"layers {name} b={batch} s={s}: dense {total_d:.2f} ms, CSR {total_s:.2f} ms, ratio {total_s / total_d:.2f}", flush=True)
    return rows


def model_rows(name: str, model: nn.Module, repeats: int) -> list[dict]:
    rows = []
    for batch in BATCHES:
        x = example(name, batch)
        for s in TIME_SPARSITIES:
            dense = pruned_copy(model, s, linear_only=True)
            with torch.inference_mode():
                ref = dense(x)
                dense_ms = time_ms(lambda f=dense, x=x: f(x), repeats, min_s=0)
            all_csr = to_sparse_inference(copy.deepcopy(dense), min_sparsity=0.0, benchmark=False)
            report: dict = {}
            t0 = time.perf_counter()
            auto = to_sparse_inference(copy.deepcopy(dense), min_sparsity=0.0, benchmark=True, example_inputs=x, repeats=5, report=report)
            decide_s = time.perf_counter() - t0
            with torch.inference_mode():
                for m in (all_csr, auto):
                    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)
                csr_ms = time_ms(lambda f=all_csr, x=x: f(x), repeats, min_s=0)
                auto_ms = time_ms(lambda f=auto, x=x: f(x), repeats, min_s=0)
            replaced = sum(r["replaced"] for r in report.values())
            rows.append(dict(model=name, batch=batch, sparsity=s, dense_ms=dense_ms, all_csr_ms=csr_ms, auto_ms=auto_ms,
                             auto_csr_layers=f"{replaced}/{len(report)}", decide_s=decide_s))
            print(f"model {name} b={batch} s={s}: dense {dense_ms:.2f}, all CSR {csr_ms:.2f}, auto {auto_ms:.2f} ms "
                  f"({replaced}/{len(report)} CSR, decided in {decide_s:.1f} s)", flush=True)
    return rows


def write(out: Path, sizes, layers, models, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "export_cpu.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "model", "dtype", "batch", "sparsity", "layer", "metric", "value"])
        for r in sizes:
            for k in ("weights", "dense_bytes", "compressed_bytes", "dense_bytes_per_weight", "bytes_per_weight",
                      "target_bytes_per_weight", "ideal", "ratio", "save_s", "load_s"):
                w.writerow(["size", r["model"], r["dtype"], "", r["sparsity"], "", k, r[k]])
        for r in layers:
            for k in ("rows", "dense_ms", "csr_ms"):
                if r[k] != "":
                    w.writerow(["layer", r["model"], "float32", r["batch"], r["sparsity"], r["layer"], k, r[k]])
        for r in models:
            for k in ("dense_ms", "all_csr_ms", "auto_ms", "auto_csr_layers", "decide_s"):
                w.writerow(["model", r["model"], "float32", r["batch"], r["sparsity"], "", k, r[k]])

    md = [header, "", "## Compressed checkpoint size", "",
          "Bytes per weight: the whole file over every element of the state dict; *targets*: the pruned "
          "Conv/Linear weights saved alone, against the ideal (1 − s)·bytes_per_value + 1/8. "
          "Every round trip `torch.equal`.", "",
          "| model | dtype | sparsity | torch.save (MB) | compressed (MB) | of dense | bytes/weight | targets bytes/weight | ideal | save (s) | load (s) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sizes:
        md.append(f"| {r['model']} | {r['dtype']} | {r['sparsity']:.0%} | {r['dense_bytes'] / 1e6:.2f} | {r['compressed_bytes'] / 1e6:.2f} | "
                  f"{r['ratio']:.3f} | {r['bytes_per_weight']:.3f} | {r['target_bytes_per_weight']:.3f} | {r['ideal']:.3f} | "
                  f"{r['save_s']:.2f} | {r['load_s']:.2f} |")
    md += ["", "## CSR time / dense time, Linear layers", "",
           "Sum over all `nn.Linear` layers of the median time of each on its real input (float32, `inference_mode`). "
           "< 1 means CSR is faster.", "",
           "| model | batch | rows (largest) | dense (ms) | " + " | ".join(f"CSR {s:.0%}" for s in TIME_SPARSITIES) + " |",
           "|---|---|---|---|" + "---|" * len(TIME_SPARSITIES)]
    totals = {(r["model"], r["batch"], r["sparsity"]): r for r in layers if r["layer"] == "all Linear"}
    row_count = {}
    for r in layers:
        if r["layer"] != "all Linear":
            row_count[(r["model"], r["batch"])] = max(r["rows"], row_count.get((r["model"], r["batch"]), 0))
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in layers):
        t = [totals[(model, batch, s)] for s in TIME_SPARSITIES]
        md.append(f"| {model} | {batch} | {row_count[(model, batch)]} | {t[0]['dense_ms']:.2f} | "
                  + " | ".join(f"{x['csr_ms'] / x['dense_ms']:.2f} ({x['csr_ms']:.2f} ms)" for x in t) + " |")
    md += ["", "Per layer shape (CSR / dense; ViT: block 0, the other blocks have the same shapes):", "",
           "| model | batch | layer | weight | rows | dense (ms) | " + " | ".join(f"{s:.0%}" for s in TIME_SPARSITIES) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(TIME_SPARSITIES)]
    per = {}
    for r in layers:
        if r["layer"] == "all Linear" or (r["model"] == "vit_tiny" and not (r["layer"].startswith("blocks.0.") or r["layer"] == "head")):
            continue
        key = (r["model"], r["batch"], r["layer"], r["shape"], r["rows"], r["dense_ms"])
        per.setdefault(key, {})[r["sparsity"]] = r["csr_ms"] / r["dense_ms"]
    for (model, batch, layer, shape, rows, dense_ms), v in per.items():
        md.append(f"| {model} | {batch} | {layer} | {shape} | {rows} | {dense_ms:.3f} | "
                  + " | ".join(f"{v[s]:.2f}" for s in TIME_SPARSITIES) + " |")
    md += ["", "## Whole model forward", "",
           "All Linear layers pruned to the sparsity. *all CSR*: every Linear a `SparseLinear`; *auto*: "
           "`to_sparse_inference(benchmark=True, example_inputs=x)`, CSR only where its timing was faster "
           "(layers chosen / candidates, and the seconds the choice took).", "",
           "| model | batch | sparsity | dense (ms) | all CSR (ms) | auto (ms) | auto / dense | CSR layers | decide (s) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in models:
        md.append(f"| {r['model']} | {r['batch']} | {r['sparsity']:.0%} | {r['dense_ms']:.2f} | {r['all_csr_ms']:.2f} | "
                  f"{r['auto_ms']:.2f} | {r['auto_ms'] / r['dense_ms']:.2f} | {r['auto_csr_layers']} | {r['decide_s']:.1f} |")
    (out / "export_cpu.md").write_text("\n".join(md) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: experiments/results)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    sizes, layers, models = [], [], []
    for name in ("mlp", "vit_tiny"):
        model = make_model(name)
        sizes += size_rows(name, model)
        layers += layer_rows(name, model, args.repeats)
        models += model_rows(name, model, max(3, args.repeats // 2))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    header = (
        "# Export on the CPU: compressed checkpoints and CSR inference\n\n"
        f"Machine: {cpu}, {args.threads} threads (`torch.set_num_threads({args.threads})`), torch {torch.__version__}, "
        f"timm {timm.__version__}. Command: `python experiments/bench_export.py --threads {args.threads}` "
        f"({time.perf_counter() - start:.0f} s). Random weights (ViT-Tiny `vit_tiny_patch16_224`, MLP 1024-4096-4096-1024), "
        "pruned by magnitude per layer. Times: median of repeats; they depend on the machine and its load."
    )
    write(args.out, sizes, layers, models, header)
    print(f"wrote {args.out / 'export_cpu.md'} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
