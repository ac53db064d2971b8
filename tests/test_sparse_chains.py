"""Linked sparse layers (sparsetrain.core.sparse.chains): inside a container of known call order, a CSR layer
whose output reaches the next CSR layer only through elementwise modules returns it in the CSR layout; the
results are those of the masked path, and nothing outside the container ever sees that layout."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.core import select_targets
from sparsetrain.core.sparse import SparseCompute

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")


def sparse_model(model: nn.Module, density: float = 0.3, seed: int = 0, mode: str = "sparse"):
    """``model`` with random masks applied, a masked twin, and a SparseCompute on the first (every 2-D weight a target)."""
    gen = torch.Generator().manual_seed(seed)
    targets = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    masks = {n: torch.rand(p.shape, generator=gen) < density for n, p in targets.items()}
    with torch.no_grad():
        for n, p in targets.items():
            p.mul_(masks[n])
    twin = copy.deepcopy(model)
    compute = SparseCompute(model, targets, masks, mode=mode)
    return model, twin, compute, masks


def links(compute: SparseCompute) -> dict[str, str]:
    return {row["layer"]: row["feeds"] for row in compute.table() if "feeds" in row}


def saved_input_of(output: torch.Tensor, node_name: str) -> torch.Tensor:
    """The input the first autograd node called ``node_name`` above ``output`` saved (what that op really got)."""
    stack, seen = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == node_name:
            return node._saved_self
        stack.extend(n for n, _ in node.next_functions)
    raise AssertionError(f"no {node_name} above the output")


def features_slowest(t: torch.Tensor) -> bool:
    return t.reshape(-1, t.shape[-1]).t().is_contiguous()


def test_links_in_a_sequential():
    seq = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.0), nn.Identity(), nn.Linear(16, 16), nn.ReLU(inplace=True),
                        nn.Linear(16, 4))  # fmt: skip
    assert links(sparse_model(seq)[2]) == {"0.weight": "4.weight", "4.weight": "6.weight"}


def test_links_in_timm_mlp():
    timm_layers = pytest.importorskip("timm.layers")  # the apps extra
    assert links(sparse_model(timm_layers.Mlp(8, 32, 8))[2]) == {"fc1.weight": "fc2.weight"}
    with_norm = timm_layers.Mlp(8, 32, 8, norm_layer=nn.LayerNorm)  # a LayerNorm between: no link
    assert links(sparse_model(with_norm)[2]) == {}


def test_links_in_hugging_face_gpt2_mlp():
    pytest.importorskip("transformers")  # the hf extra
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    mlp = GPT2MLP(32, GPT2Config(n_embd=8))
    assert links(sparse_model(mlp)[2]) == {"c_fc.weight": "c_proj.weight"}


class TokenFlatten(nn.Linear):
    def forward(self, x):
        y = super().forward(x)
        return y.view(y.shape[0], -1)


def _token_flatten():
    return nn.Sequential(TokenFlatten(8, 4), nn.ReLU(), nn.Linear(20, 3))


def _shared_producer():
    first = nn.Linear(8, 8)
    return nn.Sequential(first, nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), first)


class CustomForward(nn.Module):
    """Its forward could do anything with fc1's output: no link."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize(
    "build, why",
    [
        (lambda: nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.Linear(16, 4)), "a dropout that drops: other units in another layout"),
        (lambda: nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)), "not elementwise"),
        (_token_flatten, "the producer's forward views its output"),
        (CustomForward, "unknown forward"),
        (lambda: nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Conv1d(16, 4, 1)), "the consumer is not a CSR layer"),
    ],
)
def test_no_link_where_something_else_could_see_the_tensor(build, why):
    assert links(sparse_model(build())[2]) == {}, why


def test_a_layer_used_at_two_places_is_never_a_producer():
    model, twin, compute, masks = sparse_model(_shared_producer())
    assert links(compute) == {"2.weight": "0.weight"}  # the middle layer feeds the shared one, which accepts any layout
    x = torch.randn(5, 8)
    torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-6)
    assert model(x).is_contiguous()
    model(x).square().sum().backward()  # the shared layer's two gradients meet in autograd's buffer: both must survive
    twin(x).square().sum().backward()
    for name, mask in masks.items():
        torch.testing.assert_close(model.get_parameter(name).grad, twin.get_parameter(name).grad * mask, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("leading", [(24,), (3, 8)], ids=["2d", "3d"])
def test_linked_layers_give_the_masked_results_and_only_the_container_sees_the_layout(leading):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(inplace=True), nn.Linear(20, 20), nn.GELU(), nn.Linear(20, 6))
    model, twin, compute, masks = sparse_model(model)
    assert links(compute) == {"0.weight": "2.weight", "2.weight": "4.weight"}
    x = torch.randn(*leading, 12, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    y, y_twin = model(x), twin(x_twin)
    assert y.is_contiguous() and y.shape == y_twin.shape  # the container's output is row-major
    assert features_slowest(saved_input_of(y, "GeluBackward0"))  # inside, the CSR layout went through the GELU
    dy = torch.randn_like(y)
    y.backward(dy)
    y_twin.backward(dy)
    torch.testing.assert_close(y, y_twin, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-5, atol=1e-6)
    assert x.grad.is_contiguous()
    for name, p in model.named_parameters():
        expected = twin.get_parameter(name).grad
        if name in masks:
            expected = expected * masks[name]
            assert torch.all(p.grad[~masks[name]] == 0), name
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6, msg=name)
    # called directly, outside its container, a linked layer returns nn.Linear's layout
    direct = model[0](torch.randn(*leading, 12))
    assert direct.is_contiguous()
    compute.detach()
    assert not model._forward_hooks and not model._forward_pre_hooks and not model[0]._forward_hooks


def test_bf16_autocast_through_a_timm_mlp():
    Mlp = pytest.importorskip("timm.layers").Mlp  # the apps extra

    torch.manual_seed(0)
    model, twin, compute, masks = sparse_model(Mlp(16, 48, 16))
    assert links(compute) == {"fc1.weight": "fc2.weight"}
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_twin = model(x), twin(x)
    assert y.dtype == y_twin.dtype == torch.bfloat16 and y.is_contiguous()
    assert features_slowest(saved_input_of(y.float().sum(), "GeluBackward0"))
    torch.testing.assert_close(y.float(), y_twin.float(), rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    y_twin.float().square().sum().backward()
    for name in masks:
        assert torch.all(model.get_parameter(name).grad[~masks[name]] == 0)
        torch.testing.assert_close(model.get_parameter(name).grad, twin.get_parameter(name).grad * masks[name], rtol=5e-2, atol=5e-2)


def test_auto_links_only_when_both_layers_chose_csr():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    model, _, compute, _ = sparse_model(model, mode="auto")
    first, second = compute.layers["0.weight"], compute.layers["2.weight"]
    for choice in ("masked", "csr"):
        first.choice, second.choice = "csr", choice
        y = model(torch.randn(5, 8, requires_grad=True))
        assert features_slowest(saved_input_of(y, "GeluBackward0")) == (choice == "csr")


def _observe(model: nn.Module, case: str, seen: list) -> list:
    """Attach what could see the producer's output in ``case``; returns handles to remove."""
    def keep(*tensors):
        seen.extend(t for t in tensors if isinstance(t, torch.Tensor))

    if case == "forward_hook_added_later":  # a hook that views the tensor, as model code does
        return [model[1].register_forward_hook(lambda m, a, out: keep(out.view(out.shape[0], -1), out))]
    if case == "consumer_pre_hook":
        return [model[2].register_forward_pre_hook(lambda m, a: keep(*a))]
    if case == "producer_backward_hook":
        return [model[0].register_full_backward_hook(lambda m, gi, go: keep(*go))]
    if case == "global_forward_hook":
        return [nn.modules.module.register_module_forward_hook(lambda m, a, out: keep(out) if m is model[0] else None)]
    if case == "consumer_forward_hook":  # a forward hook gets the module's inputs (activation statistics, Wanda)
        return [model[2].register_forward_hook(lambda m, a, out: keep(*a))]
    if case in ("child_replaced", "child_inserted"):
        class Tap(nn.Module):  # replaced: the GELU it stands for; inserted: the identity (same function as the twin)
            def forward(self, x):
                keep(x)
                return F.gelu(x) if case == "child_replaced" else x

        if case == "child_replaced":
            model[1] = Tap()
        else:
            model.insert(1, Tap())
        return []
    if case in ("forward_patched_on_the_activation", "forward_patched_on_the_producer"):
        module = model[1] if case == "forward_patched_on_the_activation" else model[0]
        original = module.forward

        def patched(x):
            out = original(x)
            keep(out)
            return out

        module.forward = patched  # as accelerate's add_hook_to_module does
        return []
    if case == "forward_replaced_on_the_instance":
        def taps(self, x):
            outs = []
            for m in self:
                x = m(x)
                outs.append(x)
            keep(*outs)
            return x

        model.forward = taps.__get__(model)
        return []
    raise ValueError(case)


@pytest.mark.parametrize(
    "case",
    ["forward_hook_added_later", "consumer_pre_hook", "consumer_forward_hook", "producer_backward_hook", "global_forward_hook",
     "forward_replaced_on_the_instance", "child_replaced", "child_inserted", "forward_patched_on_the_activation",
     "forward_patched_on_the_producer"],
)  # fmt: skip
def test_what_could_see_the_producers_output_gets_the_row_major_layout(case):
    """Hooks and other callers can appear at any time, before or after the engine starts: each call checks."""
    seen: list = []
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    handles = _observe(model, case, seen) if case == "consumer_pre_hook" else []  # one registered before the engine
    model, twin, _, _ = sparse_model(model)
    handles += [] if case == "consumer_pre_hook" else _observe(model, case, seen)
    try:
        x = torch.randn(2, 3, 8)
        y = model(x)
        y.square().sum().backward()
        torch.testing.assert_close(y, twin(x), rtol=1e-5, atol=1e-6)
    finally:
        for handle in handles:
            handle.remove()
    assert seen and all(t.is_contiguous() for t in seen), case


def test_a_dropout_raised_after_the_start_drops_what_the_masked_path_drops():
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.0), nn.Linear(16, 4))
    model, twin, compute, _ = sparse_model(model)
    assert links(compute) == {"0.weight": "2.weight"}
    model[1].p = twin[1].p = 0.5
    x = torch.randn(6, 8)
    torch.manual_seed(1)
    y = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(y, twin(x), rtol=1e-5, atol=1e-6)


def test_hooks_on_the_container_keep_the_link():
    """The container's own hooks see its input and output (row-major): the link stays."""
    seen: list = []
    model, twin, _, _ = sparse_model(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)))
    model.register_forward_hook(lambda m, a, out: seen.extend([*a, out]))
    x = torch.randn(5, 8, requires_grad=True)
    y = model(x)
    assert features_slowest(saved_input_of(y, "GeluBackward0"))
    assert all(t.is_contiguous() for t in seen)
    torch.testing.assert_close(y, twin(x), rtol=1e-5, atol=1e-6)


def test_a_patched_timm_mlp_forward_ends_the_link(monkeypatch):
    timm_mlp = pytest.importorskip("timm.layers.mlp")  # the apps extra
    seen: list = []
    model, _, _, _ = sparse_model(timm_mlp.Mlp(8, 32, 8))
    original = timm_mlp.Mlp.forward

    def patched(self, x):
        h = self.fc1(x)
        seen.append(h)
        return self.fc2(self.drop1(self.act(h)))

    monkeypatch.setattr(timm_mlp.Mlp, "forward", patched)
    model(torch.randn(2, 3, 8))
    assert seen and all(t.is_contiguous() for t in seen)
    monkeypatch.setattr(timm_mlp.Mlp, "forward", original)


def test_an_interrupted_container_leaves_no_layout_behind():
    """KeyboardInterrupt inside the container's forward skips torch's always-called hooks; nothing may stay armed."""

    class Interrupt(nn.Module):
        def forward(self, x):
            raise KeyboardInterrupt

    model, _, _, _ = sparse_model(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4), Interrupt()))
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(5, 8))
    assert model[0](torch.randn(5, 8)).is_contiguous()


def test_a_deep_copy_of_a_linked_model_runs_dense_and_row_major():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    model, twin, _, _ = sparse_model(model)
    clone = copy.deepcopy(model)
    x = torch.randn(5, 8)
    torch.testing.assert_close(clone(x), twin(x))
    assert select_targets(clone)  # still an ordinary model
