"""The compiled kernels on CUDA (Triton) give what the eager ones give; run by experiments/gpu_check.sh.

Skipped without a CUDA device (every other CUDA test lives beside the code it tests)."""

import pytest
import torch

from sparsetrain.core.kernels import MaskKernel
from sparsetrain.core.stochastic import StochasticKernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_compiled_mask_kernel_on_cuda_equals_eager():
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(64, 3, 3, 3), (1000, 512), (7,)]
    tensors = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    masks = [torch.rand(s, device="cuda", generator=gen) < 0.3 for s in shapes]
    eager, compiled = [t.clone() for t in tensors], [t.clone() for t in tensors]
    MaskKernel("eager")(eager, masks)
    kernel = MaskKernel("auto")
    kernel(compiled, masks)
    assert kernel.uses_compile(torch.device("cuda"))  # no silent fallback to eager
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert all(torch.all(t[~m] == 0) for t, m in zip(compiled, masks))


def test_compiled_stochastic_kernel_on_cuda_equals_eager():
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(256, 128, device="cuda", generator=gen, requires_grad=True)]
    targets = [torch.rand(256, 128, device="cuda", generator=gen) < 0.2]
    bases = [torch.tensor(0.5, device="cuda")]
    results = {}
    for kind in ("eager", "compiled"):
        kernel = StochasticKernel(kind)
        (sampled,) = kernel.sample(weights, targets, bases, scale=0.7, seed=3)
        (grad,) = torch.autograd.grad(sampled.square().sum(), weights)
        assert kernel.uses_compile(torch.device("cuda")) == (kind == "compiled")
        results[kind] = (sampled.detach(), grad)
    assert all(torch.equal(a, b) for a, b in zip(results["eager"], results["compiled"]))
