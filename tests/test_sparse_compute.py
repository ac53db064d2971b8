"""Sparse compute (sparsetrain.core.sparse): the kernels give what the masked dense computation gives,
gradients are exactly zero at pruned positions, the model stays as it was, refusals say which and why."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.core import SparsityConfigError, select_targets
from sparsetrain.core.sparse import SparseCompute, SparsePattern, csr_linear, refusals
from sparsetrain.core.sparse.linear import (
    SemiStructuredPattern,
    semi_structured_linear,
    semi_structured_reason,
)


def masked_weight(shape, density=0.3, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < density
    weight = (torch.randn(shape, generator=gen) * mask).to(dtype).requires_grad_()
    return weight, mask


def dense_reference(x, weight, bias, transposed):
    """The masked path: a dense product (the weight is zero at pruned positions)."""
    return F.linear(x, weight.t() if transposed else weight, bias)


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d_layout"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_csr_linear_forward_and_backward_equal_masked_dense(transposed, with_bias):
    out_f, in_f = 12, 10
    weight, mask = masked_weight((in_f, out_f) if transposed else (out_f, in_f))
    bias = torch.randn(out_f, requires_grad=True) if with_bias else None
    x = torch.randn(2, 3, 5, in_f, requires_grad=True)  # leading dims
    dy = torch.randn(2, 3, 5, out_f)
    pattern = SparsePattern(mask, transposed)
    y = csr_linear(x, weight, bias, pattern)
    grads = torch.autograd.grad(y, [t for t in (x, weight, bias) if t is not None], dy)
    y_ref = dense_reference(x, weight, bias, transposed)
    ref = torch.autograd.grad(y_ref, [t for t in (x, weight, bias) if t is not None], dy)
    assert y.shape == y_ref.shape and torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(grads[0], ref[0], atol=1e-5)
    assert torch.allclose(grads[1], ref[1] * mask, atol=1e-5)
    assert torch.all(grads[1][~mask] == 0)  # exactly zero, not merely small
    if with_bias:
        assert torch.allclose(grads[2], ref[2], atol=1e-5)


def test_pattern_holds_the_csr_structures_of_the_mask_and_its_transpose():
    weight, mask = masked_weight((7, 9))
    pattern = SparsePattern(mask)
    values = pattern.values(weight.detach())
    assert torch.equal(pattern.csr(values).to_dense(), weight.detach())
    assert torch.equal(pattern.csr_t(values).to_dense(), weight.detach().t())
    assert pattern.nnz == int(mask.sum()) and pattern.crow.dtype == torch.int32


def test_weight_grad_is_a_reused_buffer_and_accumulates_correctly():
    weight, mask = masked_weight((8, 6))
    pattern = SparsePattern(mask)
    x = torch.randn(4, 6)
    csr_linear(x, weight, None, pattern).sum().backward()
    first = weight.grad.clone()
    assert weight.grad.data_ptr() == pattern._grad_buffer.data_ptr()  # taken by autograd without a copy
    csr_linear(x, weight, None, pattern).sum().backward()  # no zero_grad: accumulation
    assert torch.allclose(weight.grad, 2 * first)
    weight.grad = None
    csr_linear(x, weight, None, pattern).sum().backward()
    assert torch.allclose(weight.grad, first) and torch.all(weight.grad[~mask] == 0)

def test_a_gradient_the_caller_keeps_is_not_overwritten_by_the_next_backward():
    weight, mask = masked_weight((8, 6))
    pattern = SparsePattern(mask)
    first = torch.autograd.grad(csr_linear(torch.randn(4, 6), weight, None, pattern).sum(), weight)[0]
    kept = first.clone()
    second = torch.autograd.grad(csr_linear(torch.randn(4, 6), weight, None, pattern).sum(), weight)[0]
    assert torch.equal(first, kept) and not torch.equal(second, kept)
    old = second
    del first, second
    weight.grad = None
    csr_linear(torch.randn(4, 6), weight, None, pattern).sum().backward()  # `old` still held: a new tensor
    assert weight.grad.data_ptr() != old.data_ptr()


@pytest.mark.parametrize("write", ["add_", "foreach_add_", "copy_", "zero_grad_keep"])
def test_a_gradient_written_in_place_between_steps_leaves_no_value_at_pruned_positions(write):
    """The reused buffer skips its zeroing while nothing wrote it; anything that did (noise added in place, an
    all-reduce copying into it, a foreach op) must not leak into the next step's gradient at pruned positions."""
    weight, mask = masked_weight((8, 6))
    pattern = SparsePattern(mask)
    x = torch.randn(4, 6)
    opt = torch.optim.SGD([weight], lr=0.0)
    csr_linear(x, weight, None, pattern).sum().backward()
    expected = weight.grad.clone()
    with torch.no_grad():
        if write == "add_":
            weight.grad.add_(1.0)
        elif write == "foreach_add_":
            torch._foreach_add_([weight.grad], 1.0)
        elif write == "copy_":
            weight.grad.copy_(torch.ones_like(weight.grad))
    opt.zero_grad(set_to_none=write != "zero_grad_keep")
    if write == "zero_grad_keep":
        weight.grad.add_(1.0)  # held by .grad: the next gradient is a new tensor added in
        expected = expected + 1.0
    else:
        assert weight.grad is None
    csr_linear(x, weight, None, pattern).sum().backward()
    assert torch.equal(weight.grad, expected)
    if write != "zero_grad_keep":
        assert torch.all(weight.grad[~mask] == 0) and weight.grad.data_ptr() == pattern._grad_buffer.data_ptr()



def test_dense_grad_option_gives_the_full_gradient():
    weight, mask = masked_weight((8, 6))
    x, dy = torch.randn(4, 6), torch.randn(4, 8)
    (grad,) = torch.autograd.grad(csr_linear(x, weight, None, SparsePattern(mask), dense_grad=True), [weight], dy)
    assert torch.allclose(grad, dy.t() @ x, atol=1e-5)
    assert torch.any(grad[~mask] != 0)


def test_bfloat16_weights_and_inputs():
    weight, mask = masked_weight((16, 12), dtype=torch.bfloat16)
    x = torch.randn(5, 12, dtype=torch.bfloat16)
    y = csr_linear(x, weight, None, SparsePattern(mask))
    (grad,) = torch.autograd.grad(y.float().sum(), [weight])
    assert y.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    ref = F.linear(x.float(), weight.detach().float())
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2)
    assert torch.all(grad[~mask] == 0)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 5))


def sparse_model(model, density=0.3, mode="sparse", seed=0):
    targets = select_targets(model)
    gen = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(p.shape, generator=gen) < density for n, p in targets.items()}
    with torch.no_grad():
        for n, p in targets.items():
            p.mul_(masks[n])
    return targets, masks, SparseCompute(model, targets, masks, mode=mode)


@pytest.mark.parametrize("mode", ["sparse", "auto"])
def test_autocast_bf16_gives_bf16_outputs_and_fp32_grads_with_exact_zeros(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))  # large enough for MKL's CSR kernels
    targets, masks, compute = sparse_model(model, mode=mode)
    ref = copy.deepcopy(model)
    x = torch.randn(8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # auto times its candidates under autocast too
        y, y_ref = model(x), ref(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), y_ref.float(), atol=5e-2)
    y.float().sum().backward()
    for n in compute.sparse_targets():
        assert targets[n].grad.dtype == torch.float32 and torch.all(targets[n].grad[~masks[n]] == 0)


def test_twenty_sgd_steps_match_the_masked_path():
    model, ref = mlp(), mlp()
    _, masks, compute = sparse_model(model)
    ref.load_state_dict(model.state_dict())
    ref_targets = select_targets(ref)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, label = torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        F.cross_entropy(model(x), label).backward()
        F.cross_entropy(ref(x), label).backward()
        assert compute.grads_to_mask() == []
        for n, p in ref_targets.items():
            p.grad.mul_(masks[n])  # what the masked path does
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), n
        if n in masks:
            assert torch.all(p[~masks[n]] == 0)


def test_model_is_unchanged_while_attached_and_after_detach():
    model = mlp()
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    _, _, compute = sparse_model(model)
    x = torch.randn(3, 20)
    y = model(x)
    assert list(model.state_dict()) == keys and dict(model.named_parameters()) == params
    twin = copy.deepcopy(model)  # a copy runs dense: same result, no reference to `compute`
    assert torch.allclose(twin(x), y, atol=1e-6)
    assert torch.allclose(pickle.loads(pickle.dumps(model))(x), y, atol=1e-6)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    compute.detach()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert list(model.state_dict()) == keys and torch.allclose(model(x), y, atol=1e-6)


def test_update_masks_rebuilds_the_pattern():
    model = mlp()
    targets, _, compute = sparse_model(model)
    name = "2.weight"
    new = torch.rand(targets[name].shape, generator=torch.Generator().manual_seed(5)) < 0.1
    with torch.no_grad():
        targets[name].mul_(new)
    compute.update_masks({name: new})
    assert compute.layers[name].pattern.nnz == int(new.sum())
    x = torch.randn(4, 20)
    y = model(x)
    y.sum().backward()
    ref = copy.deepcopy(model)
    assert torch.allclose(y, ref(x), atol=1e-5)
    assert torch.all(targets[name].grad[~new] == 0)


def test_dense_weight_grads_switch():
    model = mlp()
    targets, masks, compute = sparse_model(model)
    compute.dense_weight_grads(True)
    model(torch.randn(4, 20)).sum().backward()
    assert compute.grads_to_mask() == list(targets)
    assert any(torch.any(p.grad[~masks[n]] != 0) for n, p in targets.items())
    compute.dense_weight_grads(False)
    assert compute.grads_to_mask() == []


def test_no_grad_and_inference_mode_forwards():
    model = mlp()
    sparse_model(model)
    ref = copy.deepcopy(model)
    x = torch.randn(4, 20)
    with torch.inference_mode():
        assert torch.allclose(model(x), ref(x), atol=1e-6)


def test_hf_gpt2_conv1d_layers_and_the_tied_embedding():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_positions=8,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    targets = select_targets(model)
    refused = refusals(model, targets)
    assert list(refused) == ["transformer.wte.weight"] and "lm_head" in refused["transformer.wte.weight"]
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.4 for n, p in targets.items()}
    with pytest.raises(SparsityConfigError, match="transformer.wte.weight"):
        SparseCompute(model, targets, masks, mode="sparse")
    taken = {n: p for n, p in targets.items() if n not in refused}
    with torch.no_grad():
        for n, p in taken.items():
            p.mul_(masks[n])
    ref = copy.deepcopy(model)
    compute = SparseCompute(model, taken, masks, mode="sparse")
    assert {layer.kind for layer in compute.layers.values()} == {"hf_conv1d"}
    ids = torch.randint(0, 40, (2, 8), generator=gen)
    loss, ref_loss = model(ids, labels=ids).loss, ref(ids, labels=ids).loss
    loss.backward(), ref_loss.backward()
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        expected = ref_params[n].grad * masks[n] if n in taken else ref_params[n].grad
        assert torch.allclose(p.grad, expected, atol=1e-5), n


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.attn = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_refusals_name_the_layer_and_the_reason():
    model = Net()
    targets = select_targets(model, include="attn.in_proj_weight")
    masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in targets.items()}
    refused = refusals(model, targets)
    assert "convolution" in refused["conv.weight"] and "Conv2d" in refused["conv.weight"]
    assert "MultiheadAttention" in refused["attn.out_proj.weight"]
    assert "MultiheadAttention" in refused["attn.in_proj_weight"]
    assert "fc.weight" not in refused
    with pytest.raises(SparsityConfigError, match=r"conv\.weight: Conv2d"):
        SparseCompute(model, targets, masks, mode="sparse")
    compute = SparseCompute(model, targets, masks, mode="auto")
    rows = {r["layer"]: r for r in compute.table()}
    assert rows["conv.weight"]["choice"] == "masked" and "convolution" in rows["conv.weight"]["reason"]
    assert set(compute.grads_to_mask()) >= {"conv.weight", "attn.out_proj.weight", "attn.in_proj_weight"}


class PointwiseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 16, 1)
        self.strided = nn.Conv2d(16, 4, 1, stride=2)

    def forward(self, x):
        return self.strided(torch.relu(self.point(torch.relu(self.conv(x)))))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_pointwise_convolution_runs_sparse_and_other_convolutions_are_refused(memory_format):
    model = PointwiseNet().to(memory_format=memory_format)
    targets = select_targets(model)
    refused = refusals(model, targets)
    assert set(refused) == {"conv.weight", "strided.weight"} and "stride (2, 2)" in refused["strided.weight"]
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in targets.items()}
    with torch.no_grad():
        for n, p in targets.items():
            p.mul_(masks[n])
    ref = copy.deepcopy(model)
    taken = {"point.weight": targets["point.weight"]}
    compute = SparseCompute(model, taken, masks, mode="sparse")
    x = torch.randn(2, 3, 6, 6).to(memory_format=memory_format)
    y, y_ref = model(x), ref(x)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert compute.layers["point.weight"].kind == "conv1x1" and compute.table()[0]["rows"] == 2 * 6 * 6
    y.square().sum().backward(), y_ref.square().sum().backward()
    grad, ref_grad = model.point.weight.grad, ref.point.weight.grad
    assert grad.shape == (16, 8, 1, 1) and torch.allclose(grad, ref_grad * masks["point.weight"], atol=1e-4)
    assert torch.all(grad[~masks["point.weight"]] == 0)
    assert torch.allclose(model.conv.weight.grad, ref.conv.weight.grad, atol=1e-4)  # flows through dX


def test_auto_times_a_pointwise_convolution_in_its_memory_format():
    model = PointwiseNet().to(memory_format=torch.channels_last)
    targets = select_targets(model)
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) < 0.05 for n, p in targets.items()}
    compute = SparseCompute(model, targets, masks, mode="auto")
    model(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)).sum().backward()
    row = {r["layer"]: r for r in compute.table()}["point.weight"]
    assert row["kind"] == "conv1x1" and row["ms_masked"] > 0 and row["ms_csr"] > 0 and row["choice"] in ("masked", "csr")
    assert "point.weight" in compute.grads_to_mask() or torch.all(model.point.weight.grad[~masks["point.weight"]] == 0)


class TransposingLinear(nn.Linear):
    def forward(self, x):
        return x @ self.weight.t() + self.bias  # not F.linear: the kernels cannot replace this


def test_a_forward_that_uses_the_weight_otherwise_is_refused_or_left_masked():
    model = nn.Sequential(TransposingLinear(6, 4))
    targets = select_targets(model)
    masks = {n: torch.rand(p.shape) < 0.5 for n, p in targets.items()}
    SparseCompute(model, targets, masks, mode="sparse")
    with pytest.raises(SparsityConfigError, match=r"0\.weight uses its weight in .*t"):
        model(torch.randn(2, 6))
    model = nn.Sequential(TransposingLinear(6, 4))
    targets = select_targets(model)
    compute = SparseCompute(model, targets, masks, mode="auto")
    model(torch.randn(2, 6)).sum().backward()
    assert compute.grads_to_mask() == ["0.weight"] and "uses its weight" in compute.table()[0]["reason"]


class Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x) + F.linear(x, self.fc.weight)  # a second use, outside fc's forward


def test_verify_grads_finds_a_weight_used_outside_its_module():
    model = Parent()
    targets = select_targets(model)
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) < 0.5 for n, p in targets.items()}
    compute = SparseCompute(model, targets, masks, mode="sparse")
    model(torch.randn(3, 6)).sum().backward()
    assert compute.verify_grads() == ["fc.weight"]


def test_auto_times_each_layer_once_and_leaves_the_random_stream_alone():
    model = mlp()
    targets, masks, compute = sparse_model(model, density=0.05, mode="auto")
    state = torch.get_rng_state()
    model(torch.randn(64, 20, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert torch.equal(torch.get_rng_state(), state)
    rows = compute.table()
    assert [r["layer"] for r in rows] == list(targets)
    assert all(r["choice"] in ("masked", "csr") and r["ms_masked"] > 0 and r["ms_csr"] > 0 and r["rows"] == 64 for r in rows)
    sparse = [r["layer"] for r in rows if r["choice"] == "csr"]
    assert compute.grads_to_mask() == [n for n in targets if n not in sparse]
    for n in sparse:
        assert torch.all(targets[n].grad[~masks[n]] == 0)
    masked = [n for n in targets if n not in sparse]
    assert all(not compute.layers[n].handles for n in masked)  # no interception cost for masked layers


def test_auto_takes_a_sparse_kernel_only_when_it_is_clearly_faster():
    """A near tie in a timing of a few milliseconds is noise: masked, the known path, keeps the layer."""
    from sparsetrain.core.sparse import calibrate

    assert calibrate.choose({"masked": 1.0, "csr": 0.95}) == "masked"
    assert calibrate.choose({"masked": 1.0, "csr": 0.85}) == "csr"
    assert calibrate.choose({"masked": 1.0, "csr": 0.95, "2:4": 0.5}) == "2:4"
    assert calibrate.choose({"masked": 0.5, "csr": 1.0}) == "masked"
    assert calibrate.choose({"masked": 1.0}) == "masked"


def test_bad_arguments():
    model = mlp()
    targets = select_targets(model)
    masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in targets.items()}
    with pytest.raises(SparsityConfigError, match="mode='dense'"):
        SparseCompute(model, targets, masks, mode="dense")
    with pytest.raises(SparsityConfigError, match="kernels"):
        SparseCompute(model, targets, masks, kernels=("bsr",))
    with pytest.raises(SparsityConfigError, match="no mask for 0.weight"):
        SparseCompute(model, targets, {}, mode="sparse")
    with pytest.raises(SparsityConfigError, match="mask of 0.weight"):
        SparseCompute(model, targets, {**masks, "0.weight": masks["0.weight"].t()}, mode="sparse")


def test_two_four_needs_cuda_and_a_two_four_mask():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:, ::2] = True
    if not torch.cuda.is_available():
        assert "CUDA" in semi_structured_reason(mask)
    else:
        assert "not 2:4" in semi_structured_reason(torch.ones(8, 8, dtype=torch.bool, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels need a GPU")
def test_csr_linear_on_cuda():
    weight, mask = masked_weight((64, 48))
    weight = weight.detach().cuda().requires_grad_()
    mask = mask.cuda()
    x = torch.randn(2, 16, 48, device="cuda", requires_grad=True)
    y = csr_linear(x, weight, None, SparsePattern(mask))
    gx, gw = torch.autograd.grad(y.square().sum(), [x, weight])
    rx, rw = torch.autograd.grad(F.linear(x, weight).square().sum(), [x, weight])
    assert torch.allclose(y, F.linear(x, weight), atol=1e-4)
    assert torch.allclose(gx, rx, atol=1e-3) and torch.allclose(gw, rw * mask, atol=1e-3)
    assert torch.all(gw[~mask] == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels need a GPU")
def test_linked_csr_layers_on_cuda():
    """A linked pair (features-slowest hand-over, written by cuSPARSE through ``out=``) gives the masked results."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 32)).cuda()
    _, masks, compute = sparse_model(model, density=0.3, mode="sparse")
    assert compute.table()[0].get("feeds") == "2.weight"
    reference = copy.deepcopy(model)  # inert hooks: the masked path
    x = torch.randn(2, 16, 48, device="cuda")
    y = model(x)
    torch.testing.assert_close(y, reference(x), rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    reference(x).square().sum().backward()
    for name, mask in masks.items():
        grad = model.get_parameter(name).grad
        torch.testing.assert_close(grad, reference.get_parameter(name).grad * mask, rtol=1e-3, atol=1e-3)
        assert torch.all(grad[~mask] == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 kernels need a GPU")
def test_semi_structured_linear_on_cuda():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 kernels need compute capability >= 8.0")
    torch.manual_seed(0)
    out_f, in_f = 128, 128
    scores = torch.rand(out_f, in_f // 4, 4)
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, dim=-1).indices, True)
    mask = mask.reshape(out_f, in_f).cuda()
    weight = (torch.randn(out_f, in_f, device="cuda") * mask).requires_grad_()
    x = torch.randn(64, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pattern = SemiStructuredPattern(mask)
    y = semi_structured_linear(x, weight, None, pattern, dtype=torch.bfloat16)
    gx, gw = torch.autograd.grad(y.float().square().sum(), [x, weight])
    ref_y = F.linear(x, weight.to(torch.bfloat16))
    rx, rw = torch.autograd.grad(ref_y.float().square().sum(), [x, weight])
    assert torch.allclose(y.float(), ref_y.float(), rtol=2e-2, atol=2e-2)
    assert torch.allclose(gx.float(), rx.float(), rtol=5e-2, atol=5e-2)
    assert torch.allclose(gw, rw * mask, rtol=5e-2, atol=5e-2) and torch.all(gw[~mask] == 0)


@pytest.mark.parametrize("shape", [(6, 10), (2, 3, 10), (1, 10)], ids=["rows", "leading_dims", "one_row"])
def test_an_in_place_op_after_a_sparse_layer_works(shape):
    """nn.ReLU(inplace=True) after the layer (LeNet, VGG, ResNet heads): the kernel's output is not a view."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(inplace=True), nn.Linear(12, 4))
    targets = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    masks = {n: torch.rand(p.shape) < 0.3 for n, p in targets.items()}
    with torch.no_grad():
        for n, p in targets.items():
            p.mul_(masks[n])
    reference = copy.deepcopy(model)
    compute = SparseCompute(model, targets, masks, "sparse")
    x = torch.randn(shape)
    model(x).sum().backward()
    reference(x).sum().backward()
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad * masks[n] if n in masks else q.grad, msg=n)
    compute.detach()


@pytest.mark.parametrize("leading", [(6,), (2, 3), (), (0,)], ids=["rows", "leading_dims", "no_batch", "no_rows"])
def test_the_output_is_row_major_like_nn_linear_and_its_own_base(leading):
    """Model code views a linear layer's output (``q_proj(x).view(B, T, heads, -1)``, ``fc(x).view(B, -1)``) and
    attention kernels want a contiguous last dim: the result has ``nn.Linear``'s layout. It is its own base, not a
    view (in-place ops after the layer are allowed)."""
    weight, mask = masked_weight((12, 10))
    x = torch.randn(*leading, 10)
    y = csr_linear(x, weight, None, SparsePattern(mask))
    assert y.shape == (*leading, 12) and y.is_contiguous() and not y._is_view()
    assert torch.equal(y.view(-1), y.reshape(-1))
    assert torch.allclose(y, F.linear(x, weight), atol=1e-5)


def test_torch_compile_runs_the_sparse_kernels_and_gives_the_masked_results():
    """``torch.compile`` of a model on sparse kernels (what docs/sparse_compute.md promises): Dynamo breaks the graph
    around each sparse layer and the kernels run eagerly; the results and the exact zeros are those of the masked
    path. The ``eager`` backend needs no C++ compiler, so this runs on any CI machine."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.GELU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4))
    _, masks, compute = sparse_model(model)
    reference = copy.deepcopy(model)  # a copy's hooks are inert: it runs the masked path
    compiled = torch.compile(model, backend="eager")
    for _ in range(2):  # the second call runs what the first compiled
        x = torch.randn(6, 10)
        y = compiled(x)
        torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-6)
        y.square().sum().backward()
        reference(x).square().sum().backward()
        for n, p in model.named_parameters():
            q = reference.get_parameter(n)
            torch.testing.assert_close(p.grad, q.grad * masks[n] if n in masks else q.grad, rtol=1e-5, atol=1e-6, msg=n)
            if n in masks:
                assert torch.all(p.grad[~masks[n]] == 0), n
            p.grad, q.grad = None, None
    compute.detach()
    torch._dynamo.reset()
