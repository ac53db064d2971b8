"""Eager and compiled mask kernels: identical results, clean fallback."""

import warnings

import lightning as L
import pytest
import torch

from sparsetrain import SparsityCallback, SparsityConfigError
from sparsetrain.core import kernels
from sparsetrain.core.kernels import MaskKernel
from sparsetrain.methods import GMP
from tests.helpers import TinyNet, random_loader, trainer


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(16, 8, 3, 3, generator=g), torch.randn(10, 32, generator=g)]
    ms = [torch.rand(16, 8, 3, 3, generator=g) > 0.7, torch.rand(10, 32, generator=g) > 0.7]
    return ts, ms


def test_unknown_kernel_is_refused():
    with pytest.raises(SparsityConfigError, match="kernel='triton' is unknown; allowed: auto, eager, compiled"):
        SparsityCallback(GMP(), kernel="triton")


def test_auto_is_eager_on_cpu():
    assert not MaskKernel("auto").uses_compile(torch.device("cpu"))
    assert MaskKernel("auto").uses_compile(torch.device("cuda"))


def test_eager_cpu_chunks_large_tensors_with_the_same_result(monkeypatch):
    monkeypatch.setattr(kernels, "CPU_CHUNK", 100)  # 1000 = 10 chunks, 250 = 3 (the last short), 60 = whole
    g = torch.Generator().manual_seed(1)
    big, odd, small = torch.randn(10, 100, generator=g), torch.randn(5, 50, generator=g), torch.randn(60, generator=g)
    strided = torch.randn(300, 4, generator=g).t()  # not contiguous: multiplied whole
    ts = [big, odd, small, strided]
    ms = [torch.rand(t.shape, generator=g) > 0.5 for t in ts]
    chunked_ts, chunked_ms = kernels.cpu_chunks(ts, [m.view(torch.uint8) for m in ms])
    assert [t.numel() for t in chunked_ts] == [100] * 10 + [100, 100, 50] + [60, 1200]
    assert all(t.data_ptr() == c.data_ptr() for t, c in [(big, chunked_ts[0]), (odd, chunked_ts[10])])  # views
    expected = [t * m for t, m in zip(ts, ms)]
    MaskKernel("eager")(ts, ms)
    for t, e in zip(ts, expected):
        assert torch.equal(t, e)


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    kernel = MaskKernel("compiled")
    ts, ms = tensors()
    expected = [t * m for t, m in zip(ts, ms)]
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler.*eager foreach mask kernel") as record:
        kernel(ts, ms)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel(ts, ms)  # no second warning
    assert len(record) == 1 and not kernel.uses_compile(torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(ts, expected))


@pytest.mark.slow
def test_compiled_and_eager_give_bit_identical_training():
    finals = {}
    for kind in ("eager", "compiled"):
        L.seed_everything(0)
        model = TinyNet()
        cb = SparsityCallback(GMP(sparsity=0.8, start=0, end=8, every=2), kernel=kind)
        trainer(max_epochs=2, callbacks=[cb]).fit(model, random_loader())
        finals[kind] = model.state_dict()
        assert cb.kernel.uses_compile(torch.device("cpu")) == (kind == "compiled")  # no silent fallback
    for name, value in finals["eager"].items():
        assert torch.equal(value, finals["compiled"][name]), name
