"""Eager and compiled mask kernels: identical results, clean fallback."""

import warnings

import lightning as L
import pytest
import torch

from sparsetrain import SparsityCallback, SparsityConfigError
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
