"""Which sparse layers may hand their output to the next one in the CSR kernels' own layout.

The CSR product computes ``Y^T`` (features by rows). A layer returns ``Y`` row-major, as ``nn.Linear``
does: one reordering copy. The next CSR layer needs ``X^T`` and reorders its input back: a second copy;
and the backward does the same twice with the gradients. Where a layer's output goes only through
elementwise modules into another CSR layer, those four copies buy nothing: the layer can return ``Y``
*features-slowest* (the same ``(..., features)`` tensor, stored as ``Y^T``), the elementwise modules keep
that layout (torch's elementwise kernels follow their input's strides), the next layer reads ``X^T`` from
it without a copy, and the gradients flow back in the same layout. On a ViT-B MLP (768-3072-768, batch
512, 98 %) the four copies are about a sixth of the sparse step.

Another layout is only safe where nothing else sees the tensor (model code views a linear layer's
output, ``q_proj(x).view(B, T, heads, -1)``), so links are found only inside containers whose forward
calls its children one after the other and does nothing else:

* ``nn.Sequential`` and subclasses that keep its forward (torchvision's ``MLP`` and ViT ``MLPBlock``);
* timm's ``Mlp`` (``fc1, act, drop1, norm, fc2, drop2``: ViT, DeiT, and the other timm MLP blocks);
* Hugging Face ``GPT2MLP`` (``c_fc, act, c_proj, dropout``).

Between the two layers only modules of an exact elementwise type may stand: ``nn.Identity``, the
``torch.nn`` activations, timm's and Hugging Face's GELU/SiLU activation classes, and ``nn.Dropout`` with
``p == 0`` (a dropout that drops draws its random mask in memory order, so another layout would drop other
units than the masked path). A link needs both layers to run on CSR, the producer used at one place of the
model, and no forward hooks on the producer or the modules between (a hook might view the tensor);
global module hooks turn every link off.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module

# containers whose forward calls these children in this order and nothing else, by (module, class name)
_CALL_ORDER = {
    ("timm.layers.mlp", "Mlp"): ("fc1", "act", "drop1", "norm", "fc2", "drop2"),
    ("transformers.models.gpt2.modeling_gpt2", "GPT2MLP"): ("c_fc", "act", "c_proj", "dropout"),
}
_ELEMENTWISE_TYPES = frozenset(
    [nn.Identity, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU,
     nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus]
)  # fmt: skip
_ELEMENTWISE_NAMES = frozenset(
    [("timm.layers.activations", n) for n in ("GELU", "GELUTanh", "QuickGELU", "Swish", "Mish", "HardSwish", "HardSigmoid")]
    + [("transformers.activations", n) for n in ("NewGELUActivation", "GELUActivation", "FastGELUActivation",
                                                  "QuickGELUActivation", "GELUTanh", "PytorchGELUTanh", "SiLUActivation")]
)  # fmt: skip


def links(model: nn.Module, csr_modules: dict[int, str]) -> dict[str, tuple[str, nn.Module]]:
    """``{producer: (consumer, container)}`` by target name: inside ``container``'s forward (a container of known
    call order) the producer's output reaches only the consumer, through elementwise modules. Called directly,
    outside that forward, the producer's output may go anywhere: the engine links only within the container's
    forward. ``csr_modules``: ``id(module) -> target name`` for the layers that may run on CSR (``nn.Linear``
    and Hugging Face ``Conv1D``)."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return {}
    places: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        places[id(m)] = places.get(id(m), 0) + 1
    found = {}
    for container in model.modules():
        children = _call_order(container)
        for i, producer in enumerate(children or ()):
            if id(producer) not in csr_modules or places[id(producer)] != 1 or producer._forward_hooks:
                continue
            j = i + 1
            while j < len(children) and _elementwise(children[j]):
                j += 1
            if j < len(children) and id(children[j]) in csr_modules:
                found[csr_modules[id(producer)]] = (csr_modules[id(children[j])], container)
    return found


def _call_order(container: nn.Module) -> list[nn.Module] | None:
    cls = type(container)
    if isinstance(container, nn.Sequential) and cls.forward is nn.Sequential.forward:
        return list(container)
    names = _CALL_ORDER.get((cls.__module__, cls.__name__))
    if names is None or not all(isinstance(getattr(container, n, None), nn.Module) for n in names):
        return None
    return [getattr(container, n) for n in names]


def _elementwise(module: nn.Module) -> bool:
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    cls = type(module)
    if cls is nn.Dropout:
        return module.p == 0
    return cls in _ELEMENTWISE_TYPES or (cls.__module__, cls.__name__) in _ELEMENTWISE_NAMES
