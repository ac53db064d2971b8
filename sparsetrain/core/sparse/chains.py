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
units than the masked path). Both layers must run ``nn.Linear``'s or ``Conv1D``'s own forward (a subclass's
forward could view the tensor) on CSR, and the producer must be used at one place of the model.

The structure, hooks and callers are checked again at every call of the producer (:func:`active`), since
they can change at any time (a module replaced or inserted, a forward patched on an instance or a class, a
dropout's ``p`` raised, a hook added): the layout is used only while the container's own forward is the caller (found on the call stack:
the same layer called from anywhere else, or by a container whose forward was replaced on the instance, returns
the row-major layout), with no global module hooks, no backward hooks on the modules of the link, no forward
hooks on the modules between, and no hooks but the engine's own on the producer's output or the consumer's inputs (forward pre-hooks and
forward hooks, which get the inputs too).
Whatever cannot be confirmed gets the row-major layout: a link only ever saves copies.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

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


@dataclass(frozen=True, eq=False)
class Link:
    """A producer's output reaches ``consumer`` (a target name) through ``modules[1:-1]`` inside ``container``."""

    container: nn.Module
    forward: object  # the container class's forward when the link was found
    index: int  # the producer's place in the container's call order
    modules: tuple[nn.Module, ...]  # the producer, the elementwise modules between, the consumer
    consumer: str


def links(model: nn.Module, csr_modules: dict[int, str]) -> dict[str, Link]:
    """``{producer: Link}`` by target name, for the structure of ``model`` (everything is checked again per call:
    :func:`active`). ``csr_modules``: ``id(module) -> target name`` for the layers that may run on CSR
    (``nn.Linear`` and Hugging Face ``Conv1D``)."""
    places: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        places[id(m)] = places.get(id(m), 0) + 1
    found = {}
    for container in model.modules():
        children = _call_order(container)
        for i, producer in enumerate(children or ()):
            if id(producer) not in csr_modules or places[id(producer)] != 1:
                continue
            j = i + 1
            while j < len(children) and _elementwise(children[j]):
                j += 1
            if j < len(children) and id(children[j]) in csr_modules and _unchanged(children[i : j + 1]):
                modules = tuple(children[i : j + 1])
                found[csr_modules[id(producer)]] = Link(container, type(container).forward, i, modules, csr_modules[id(children[j])])
    return found


def active(link: Link, own_hooks: tuple[type, ...]) -> bool:
    """At a call of the link's producer: may its output take the CSR layout now? Checks the structure again (a
    module replaced or inserted, a forward patched, a dropout's ``p`` raised since), the hooks (``own_hooks``: the
    engine's hook types, allowed on the producer and the consumer) and the caller."""
    container = link.container
    if (
        _module._global_forward_hooks or _module._global_forward_pre_hooks
        or _module._global_backward_hooks or _module._global_backward_pre_hooks
        or type(container).forward is not link.forward or "forward" in vars(container)
    ):  # fmt: skip
        return False
    children = _call_order(container)
    if children is None or len(children) < link.index + len(link.modules):
        return False
    if any(a is not b for a, b in zip(children[link.index :], link.modules)) or not _unchanged(link.modules):
        return False
    producer, *between, consumer = link.modules
    if any(m._backward_hooks or m._backward_pre_hooks for m in link.modules):
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in between):
        return False
    own = (*producer._forward_hooks.values(), *consumer._forward_pre_hooks.values(), *consumer._forward_hooks.values())
    if not all(isinstance(h, own_hooks) for h in own):
        return False
    return _called_by(container, producer)


def _unchanged(modules) -> bool:
    """Producer and consumer run their class's own ``nn.Linear``/``Conv1D`` forward; the modules between are elementwise."""
    producer, *between, consumer = modules
    return _plain_forward(producer) and _plain_forward(consumer) and all(_elementwise(m) for m in between)


_CALL_CODES = (nn.Module._call_impl.__code__, nn.Module._wrapped_call_impl.__code__)
_MAX_FRAMES = 24  # the producer's call is a few frames up: its forward, the engine's mode and product


def _called_by(container: nn.Module, producer: nn.Module) -> bool:
    """Whether the innermost call of ``producer`` on this thread was made by ``container``'s own forward. Reads the
    locals of call frames only (the module's ``__call__``, and the one that called the container's forward): a
    snapshot of the forward's own locals would keep its previous activation alive until the container returns."""
    frame = sys._getframe(2)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return False
        if frame.f_code in _CALL_CODES and frame.f_locals.get("self") is producer:
            while frame is not None and frame.f_code in _CALL_CODES:
                frame = frame.f_back
            if frame is None or frame.f_code is not type(container).forward.__code__:
                return False
            caller = frame.f_back  # the container's __call__ (or the closure it runs its forward in, with hooks)
            return caller is not None and caller.f_locals.get("self") is container
        frame = frame.f_back
    return False


def _plain_forward(module: nn.Module) -> bool:
    """``nn.Linear``'s or Hugging Face ``Conv1D``'s own forward (not a subclass's, not one set on the instance)."""
    if "forward" in vars(module):
        return False
    cls = type(module)
    return cls.forward is nn.Linear.forward or (cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils")


def _call_order(container: nn.Module) -> list[nn.Module] | None:
    cls = type(container)
    if isinstance(container, nn.Sequential) and cls.forward is nn.Sequential.forward:
        return list(container)
    names = _CALL_ORDER.get((cls.__module__, cls.__name__))
    if names is None or cls.forward.__qualname__ != f"{cls.__name__}.forward" or cls.forward.__module__ != cls.__module__:
        return None  # not that class's own forward (patched)
    if not all(isinstance(getattr(container, n, None), nn.Module) for n in names):
        return None
    return [getattr(container, n) for n in names]


def _elementwise(module: nn.Module) -> bool:
    cls = type(module)
    if "forward" in vars(module):
        return False
    if cls is nn.Dropout:
        return module.p == 0
    return cls in _ELEMENTWISE_TYPES or (cls.__module__, cls.__name__) in _ELEMENTWISE_NAMES
