"""sparsetrain.export: permanent zeros, compressed checkpoints, CSR inference, 2:4 checks."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from sparsetrain import SparsityCallback
from sparsetrain.export import (
    SparseLinear,
    is_n_m_sparse,
    load_compressed,
    make_permanent,
    n_m_mask,
    pack_bits,
    permanent_state_dict,
    save_compressed,
    to_semi_structured,
    to_sparse_inference,
    unpack_bits,
)
from sparsetrain.methods import GMP
from tests.helpers import TinyNet, random_loader, trainer

ROOT = Path(__file__).resolve().parents[1]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bit-exact comparisons (-0.0 vs +0.0, NaN payloads)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _prune(t: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the smallest |t| so that ``sparsity`` of the entries are zero (in place)."""
    k = round(sparsity * t.numel())
    if k:
        idx = t.detach().abs().float().reshape(-1).topk(k, largest=False).indices
        t.detach().view(-1)[idx] = 0
    return t


@pytest.fixture(scope="module")
def trained():
    L.seed_everything(0)
    model = TinyNet()
    cb = SparsityCallback(GMP(sparsity=0.9, start=0, end=4, every=1))
    trainer(max_epochs=1, callbacks=[cb]).fit(model, random_loader(n=64))
    model.eval()
    return model, cb


def test_make_permanent_loads_with_plain_torch_only(trained, tmp_path):
    model, cb = trained
    keys = list(model.state_dict())
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    hooks = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}
    make_permanent(model, cb.masks)
    assert list(model.state_dict()) == keys
    assert {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()} == hooks
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    for name, mask in cb.masks.items():
        w = model.get_parameter(name)
        assert (w[~mask] == 0).all() and not torch.signbit(w[~mask]).any()  # +0.0 exactly
        assert float((w == 0).float().mean()) >= 0.89
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    torch.save(after, tmp_path / "logits.pt")
    code = textwrap.dedent(
        """
        import sys, torch
        from torch import nn
        class TinyNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 8, 3, padding=1)
                self.bn = nn.BatchNorm2d(8)
                self.fc1 = nn.Linear(8 * 4 * 4, 32)
                self.fc2 = nn.Linear(32, 10)
            def forward(self, x):
                x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
                return self.fc2(torch.relu(self.fc1(x.flatten(1))))
        d = sys.argv[1]
        torch.set_num_threads(1)
        net = TinyNet()
        net.load_state_dict(torch.load(d + "/model.pt", weights_only=True))
        net.eval()
        with torch.no_grad():
            y = net(torch.load(d + "/x.pt", weights_only=True))
        assert torch.equal(y, torch.load(d + "/logits.pt", weights_only=True)), (y - torch.load(d + "/logits.pt")).abs().max()
        assert not any(m.split(".")[0] in ("sparsetrain", "lightning", "pytorch_lightning") for m in sys.modules), "imported"
        print("OK")
        """
    )
    out = subprocess.run([sys.executable, "-I", "-c", code, str(tmp_path)], check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"


def test_export_module_needs_only_torch():
    """Export works where only torch is installed: Lightning blocked, nothing of it is loaded. (It used to be a
    self-contained file; it now shares sparsetrain.core's bit packing, layouts and N:M masks, which are plain torch.)"""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["lightning"] = sys.modules["pytorch_lightning"] = None
        import torch
        from sparsetrain.export import is_n_m_sparse, n_m_mask, pack_bits, unpack_bits
        mask = torch.rand(37) > 0.5
        assert torch.equal(unpack_bits(pack_bits(mask), 37), mask)
        w = torch.randn(8, 16)
        assert is_n_m_sparse(w * n_m_mask(w))
        bad = [m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric") and sys.modules[m]]
        assert not bad, bad
        print("OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr


def test_make_permanent_without_masks_writes_positive_zeros():
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight.mul_((torch.arange(32).view(4, 8) % 2).float())  # multiply by 0 keeps -0.0 on negatives
    assert torch.signbit(lin.weight[lin.weight == 0]).any()
    make_permanent(lin)
    assert not torch.signbit(lin.weight[lin.weight == 0]).any()


def test_permanent_state_dict_leaves_model_alone(trained):
    model, cb = trained
    mask = {"fc1.weight": torch.zeros_like(cb.masks["fc1.weight"])}
    sd = permanent_state_dict(model, mask)
    assert (sd["fc1.weight"] == 0).all() and (model.fc1.weight != 0).any()
    with pytest.raises(KeyError, match="names no tensor"):
        permanent_state_dict(model, {"nope.weight": mask["fc1.weight"]})


def test_pack_bits_matches_numpy_little_endian():
    for n in (1, 7, 8, 9, 1000, 4099):
        m = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
        packed = pack_bits(m)
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
        assert np.array_equal(packed.numpy(), np.packbits(m.numpy(), bitorder="little"))
        assert torch.equal(unpack_bits(packed, n), m)


def _state_dict_for_roundtrip():
    g = torch.Generator().manual_seed(0)
    sd = {
        "a.weight": _prune(torch.randn(64, 33, generator=g), 0.9),
        "b.weight": _prune(torch.randn(40, 40, generator=g), 0.7).bfloat16(),
        "c.weight": _prune(torch.randn(16, 3, 3, 3, generator=g), 0.95).half(),
        "dense": torch.randn(10, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        "flags": torch.tensor([True, False]),
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(0.0),
        "allzero": torch.zeros(3, 5, dtype=torch.float64),
    }
    w = sd["a.weight"]
    w[0, :4] = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf")])  # -0.0 is pruned, the rest kept
    sd["tied"] = sd["a.weight"]
    return sd


@pytest.mark.parametrize("target", ["path", "bytesio"])
def test_compressed_roundtrip_is_exact(tmp_path, target):
    sd = _state_dict_for_roundtrip()
    f = tmp_path / "c.pt" if target == "path" else io.BytesIO()
    save_compressed(sd, f)
    if target == "bytesio":
        f.seek(0)
    out = load_compressed(f)
    assert list(out) == list(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert torch.equal(torch.nan_to_num(out[k]), torch.nan_to_num(v)), k
        assert torch.equal(out[k].isnan(), v.isnan()), k
    # bit-exact apart from the sign of the pruned -0.0, which comes back +0.0
    expected = _bits(sd["a.weight"].clone().masked_fill_(sd["a.weight"] == 0, 0))
    assert torch.equal(_bits(out["a.weight"]), expected)
    for k in ("b.weight", "c.weight", "dense", "allzero"):
        assert torch.equal(_bits(out[k]), _bits(sd[k])), k
    assert out["tied"] is out["a.weight"]


def test_compressed_file_loads_with_weights_only(tmp_path):
    sd = _state_dict_for_roundtrip()
    save_compressed(sd, tmp_path / "c.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["format"] == "sparsetrain.compressed" and raw["version"] == 1 and raw["bitorder"] == "little"
    assert raw["tensors"]["a.weight"]["kind"] == "bitmask" and raw["tensors"]["dense"]["kind"] == "dense"
    assert raw["tensors"]["b.weight"]["values"].dtype == torch.bfloat16
    assert raw["tensors"]["tied"] == {"kind": "alias", "of": "a.weight"}


def test_compressed_with_masks_and_model(trained, tmp_path):
    model, cb = trained
    make_permanent(model, cb.masks)
    save_compressed(model, tmp_path / "m.pt", masks=cb.masks, min_sparsity=1.0)  # masks alone decide
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert {k for k, e in raw["tensors"].items() if e["kind"] == "bitmask"} == set(cb.masks)
    fresh = TinyNet()
    sd = load_compressed(tmp_path / "m.pt", model=fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(_bits(sd[k]), _bits(v)) and torch.equal(fresh.state_dict()[k], v), k


def test_compressed_warns_for_nonzero_outside_mask(tmp_path):
    w = torch.randn(8, 8)
    with pytest.warns(UserWarning, match="non-zero"):
        save_compressed({"w": w}, tmp_path / "w.pt", masks={"w": torch.rand(8, 8) < 0.5})
    assert torch.equal(load_compressed(tmp_path / "w.pt")["w"], w)


@pytest.mark.parametrize("dtype,bytes_per_value", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_compressed_size_at_90_percent(dtype, bytes_per_value):
    w = _prune(torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)), 0.9).to(dtype)
    f = io.BytesIO()
    save_compressed({"w": w}, f)
    per_weight = f.getbuffer().nbytes / w.numel()
    ideal = 0.1 * bytes_per_value + 1 / 8
    assert abs(per_weight - ideal) / ideal < 0.10, (per_weight, ideal)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10, bias=False))

    def forward(self, x):
        return self.net(x)


def _sparse_mlp(sparsity=0.95):
    torch.manual_seed(0)
    mlp = MLP().eval()
    with torch.no_grad():
        for m in mlp.modules():
            if isinstance(m, nn.Linear):
                _prune(m.weight, sparsity)
    return mlp


def test_to_sparse_inference_matches_dense():
    mlp = _sparse_mlp()
    dense_weight = mlp.net[2].weight.detach().clone()
    x = torch.randn(5, 3, 64)
    with torch.inference_mode():
        ref = mlp(x)
    report = {}
    to_sparse_inference(mlp, min_sparsity=0.9, benchmark=False, report=report)
    assert sum(isinstance(m, SparseLinear) for m in mlp.modules()) == 3 and all(r["replaced"] for r in report.values())
    assert mlp.net[0].weight.layout == torch.sparse_csr
    with torch.inference_mode():
        out = mlp(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x[0]), ref[0], rtol=1e-5, atol=1e-6)
    back = mlp.net[2].to_linear()
    assert isinstance(back, nn.Linear) and torch.equal(back.weight, dense_weight)


def test_to_sparse_inference_threshold_and_benchmark():
    mlp = _sparse_mlp(0.5)
    to_sparse_inference(mlp, min_sparsity=0.8, benchmark=False)
    assert not any(isinstance(m, SparseLinear) for m in mlp.modules())
    mlp = _sparse_mlp(0.95)
    x = torch.randn(4, 64)
    with torch.inference_mode():
        ref = mlp(x)
    report = {}
    to_sparse_inference(mlp, min_sparsity=0.8, benchmark=True, example_inputs=x, repeats=3, report=report)
    assert set(report) == {"net.0", "net.2", "net.4"}
    for name, r in report.items():
        assert r["replaced"] == (r["sparse_ms"] < r["dense_ms"])
        assert isinstance(mlp.get_submodule(name), SparseLinear) == r["replaced"]
    assert not any(m._forward_pre_hooks for m in mlp.modules())  # timing hooks removed
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)


def test_to_sparse_inference_skips_bf16_and_mha():
    lin = nn.Linear(32, 32).bfloat16()
    with torch.no_grad():
        lin.weight.zero_()
    seq = nn.Sequential(lin)
    to_sparse_inference(seq, benchmark=False)
    assert isinstance(seq[0], nn.Linear)  # no CPU CSR matmul for bf16
    mha = nn.MultiheadAttention(16, 2)
    with torch.no_grad():
        mha.out_proj.weight.zero_()
    to_sparse_inference(mha, benchmark=False)
    assert type(mha.out_proj) is not SparseLinear


def test_is_n_m_sparse():
    w = torch.randn(8, 16)
    assert not is_n_m_sparse(w)
    m = n_m_mask(w)
    assert m.sum() == w.numel() // 2 and (m.view(8, 4, 4).sum(-1) == 2).all()
    w24 = w * m
    assert is_n_m_sparse(w24, 2, 4)
    kept = w.abs().view(8, 4, 4).topk(2, dim=-1).values.sum()
    assert torch.allclose(w24.abs().sum(), kept)
    w24[0, 0:4] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # fewer than 2 non-zeros is still 2:4
    assert is_n_m_sparse(w24)
    w24[0, 0:4] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert not is_n_m_sparse(w24)
    assert not is_n_m_sparse(w24.t())  # groups run along the input (last) dim
    assert not is_n_m_sparse(torch.zeros(4, 6))  # 6 is not a multiple of 4
    assert is_n_m_sparse(torch.zeros(4, 8)) and is_n_m_sparse(torch.ones(4, 8), n=4, m=4)
    conv = torch.zeros(4, 2, 2, 2)  # in * kh * kw = 8
    conv.view(4, 8)[:, ::4] = 1
    assert is_n_m_sparse(conv, 1, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_to_semi_structured_needs_cuda():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        to_semi_structured(nn.Linear(64, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need CUDA")
def test_to_semi_structured_on_cuda():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 kernels need compute capability >= 8.0")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).half().cuda().eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(n_m_mask(m.weight))
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    with torch.inference_mode():
        ref = model(x)
    report = {}
    to_semi_structured(model, report=report)
    assert report == {"0": "2:4", "2": "2:4"}
    with torch.inference_mode():
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
