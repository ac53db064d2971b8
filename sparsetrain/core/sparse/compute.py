"""Run the masked linear layers of a model on sparse kernels, without changing the model.

:class:`SparseCompute` is what an engine holds for ``compute="sparse"`` or ``"auto"``. For each
target it can take (the ``weight`` of an ``nn.Linear`` or a subclass, of Hugging Face's ``Conv1D``,
or of a pointwise ``nn.Conv2d``: 1x1, stride 1, no padding, one group), it registers a forward pre-hook and an always-called forward hook on the module that
owns the weight. While that module's forward runs, a ``TorchFunctionMode`` replaces the one call
that multiplies by the weight (``F.linear(x, weight, bias)``, or ``torch.addmm(bias, x, weight)`` for
``Conv1D``, ``F.conv2d(x, weight, bias, ...)`` for a pointwise convolution) with a sparse kernel
(:func:`.linear.csr_linear`, :func:`.linear.csr_conv1x1`, or :func:`.linear.semi_structured_linear` for
2:4 masks on CUDA). Nothing is renamed, wrapped or parametrized: the parameter stays the
parameter, ``state_dict`` keys, ``named_parameters``, the optimizer and checkpoints are untouched,
and ``detach()`` removes the two hooks per layer. A model deep-copied or pickled while attached gets
inert copies of the hooks (they hold no reference to this object) and runs dense.

Why this design: a forward hook alone cannot replace a computation; a tensor subclass swapped into
``module._parameters`` during the forward shows a different object to anything that reads the
module in between and must be swapped back on every exit path; replacing ``forward`` or the class
breaks pickling and ``isinstance`` users. The mode sees every torch call made inside the module's
forward (one for ``nn.Linear``, four for ``Conv1D``) and nothing outside it; re-running the forward
(activation checkpointing) re-runs the hooks. Any other use of the weight inside the forward than
shape queries (``self.weight.T``, ``torch.split``, ...) is caught: ``sparse`` raises naming the
layer and the call, ``auto`` runs that layer masked from then on.

What is not taken, and why (``refused``; ``compute="sparse"`` raises listing them, ``auto``
leaves them masked):

* convolutions other than pointwise ones: im2col + CSR measured slower than oneDNN's dense kernels
  except on 4x4 maps (``docs/sparse_compute.md``);
* ``nn.MultiheadAttention`` projections: its forward passes ``in_proj_weight`` and
  ``out_proj.weight`` to ``F.multi_head_attention_forward``, which never calls ``out_proj``'s
  forward and cannot be entered by a mode without re-implementing it;
* a weight also used by another module (tied to an ``nn.Embedding``, say), a weight computed by a
  parametrization, sharded (DTensor) weights, and weights that are not 2-D, contiguous floats.

Under ``torch.compile`` the sparse kernels run eagerly: Dynamo does not trace sparse tensors and
breaks the graph around each sparse layer (correct results, one graph break per layer;
``fullgraph=True`` fails with Dynamo's own message).

A weight used *outside* its module's forward (a parent calling ``F.linear(x, child.weight)``) is
not seen by the hooks; its gradient then has non-zeros at pruned positions, which
:meth:`SparseCompute.verify_grads` (one pass, e.g. after the first step) reports.

Inside ``nn.Sequential``, timm's ``Mlp`` and Hugging Face's ``GPT2MLP``, a CSR layer whose output reaches
the next CSR layer through elementwise modules only hands it over in the CSR layout, saving two reordering
copies in the forward and two in the backward (:mod:`.chains`; ``table()`` names the layer it ``feeds``).

In ``auto`` each layer is timed at its first training forward (and again after a mask change that
moves its density to another bucket): masked dense vs each sparse kernel for the real shape, input
rows, dtype, thread count and pattern (:mod:`.calibrate`); results are cached per key for the run and
:meth:`SparseCompute.table` gives one row per layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.shards import DTensor
from sparsetrain.core.sparse import calibrate, chains
from sparsetrain.core.sparse.linear import (
    SemiStructuredPattern,
    csr_conv1x1,
    csr_linear,
    semi_structured_linear,
    semi_structured_reason,
)
from sparsetrain.core.sparse.pattern import SparsePattern

COMPUTE_MODES = ("masked", "sparse", "auto")
SPARSE_KERNELS = ("csr", "2:4")
HF_CONV1D = "Conv1D"
# reads of a weight that do not compute with its values (properties and plain queries)
_QUERY_PROPERTIES = frozenset(
    ["shape", "dtype", "device", "requires_grad", "is_cuda", "is_sparse", "is_quantized", "is_meta", "layout", "ndim", "is_leaf", "names", "grad_fn", "itemsize", "nbytes"]
)
_QUERY_METHODS = frozenset(
    [Tensor.size, Tensor.dim, Tensor.numel, Tensor.__len__, Tensor.stride, Tensor.is_contiguous, Tensor.element_size,
     Tensor.is_floating_point, Tensor.get_device, Tensor.data_ptr]
)  # fmt: skip


def _is_query(func) -> bool:
    if func in _QUERY_METHODS:
        return True
    descriptor = getattr(func, "__self__", None)
    return getattr(func, "__name__", "") == "__get__" and getattr(descriptor, "__name__", None) in _QUERY_PROPERTIES


def _is_hf_conv1d(module: nn.Module) -> bool:
    return any(c.__name__ == HF_CONV1D for c in type(module).__mro__)


@dataclass(eq=False)
class _Layer:
    """One target that runs on sparse kernels (or, in ``auto``, may)."""

    name: str  # the target's name
    module_name: str
    module: nn.Module
    weight: Tensor
    kind: str  # "linear", "hf_conv1d" (stored (in, out)), "conv1x1" (stored (out, in, 1, 1))
    mask: Tensor | None = None
    pattern: SparsePattern | None = None
    semi: SemiStructuredPattern | None = None
    choice: str | None = None  # "csr", "2:4", "masked"; None: not decided yet (auto)
    reason: str = ""  # why masked, or what decided
    timings: dict = field(default_factory=dict)
    rows: int | None = None
    foreign: bool = False  # the forward uses the weight in a call the kernels do not replace: masked for good
    handles: list = field(default_factory=list)
    mode: TorchFunctionMode | None = None
    feeds: _Layer | None = None  # the CSR layer its output reaches through elementwise modules only (.chains)
    link: chains.Link | None = None

    @property
    def features_slowest(self) -> bool:
        """Return the output in the CSR product's own layout (:mod:`.chains`): this layer and the one it feeds both
        on CSR, called by its container's forward, and nothing else able to see the output."""
        return self.choice == "csr" and self.feeds is not None and self.feeds.choice == "csr" and chains.active(self.link, (_Enter,))

    @property
    def transposed(self) -> bool:
        return self.kind == "hf_conv1d"

    @property
    def density(self) -> float:
        return self.pattern.density if self.pattern is not None else float(self.mask.float().mean())


class SparseCompute:
    """Forward and backward of the masked linear targets of ``model`` on sparse kernels.

    ``targets``: name -> parameter (the engine's targets); ``masks``: name -> bool mask (same
    shapes); ``mode``: ``"sparse"`` (every target that can, on a sparse kernel: 2:4 where the mask is
    2:4 on a CUDA GPU that has the kernels, else CSR; raises :class:`SparsityConfigError` naming each
    target it cannot take) or ``"auto"`` (each takeable layer on whichever of masked dense, CSR and
    2:4 measured fastest for it; the others stay masked). ``kernels`` limits the sparse kernels tried.

    How an engine drives it:

    * at start: construct it (after the masks exist, with the weights already zero at pruned positions);
    * after every mask change: :meth:`update_masks` with the changed masks (rebuilds their patterns);
    * before the forward of a step whose mask update needs dense gradients (RigL, GraNet):
      ``dense_weight_grads(True)``, and ``dense_weight_grads(False)`` after that update;
    * before the optimizer step, instead of masking every target's gradient: mask only the
      gradients of :meth:`grads_to_mask` (the others are exactly zero at pruned positions already);
    * once, after the first step: log :meth:`table`; optionally :meth:`verify_grads`;
    * at the end: :meth:`detach`.

    In ``auto``, a layer found faster masked loses its hooks after that forward (no cost per step
    from then on) and gets them back when its mask changes.

    The weights must stay exactly zero at pruned positions (the engine's invariant): the CSR kernels
    read only kept positions, so a stray non-zero at a pruned position would be invisible here.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        mode: str = "sparse",
        kernels: Iterable[str] = SPARSE_KERNELS,
    ):
        if mode not in ("sparse", "auto"):
            raise SparsityConfigError(f"SparseCompute mode={mode!r} is unknown; allowed: 'sparse', 'auto' ('masked' needs no SparseCompute)")
        self.kernels = tuple(kernels)
        unknown = [k for k in self.kernels if k not in SPARSE_KERNELS]
        if unknown or not self.kernels:
            raise SparsityConfigError(f"SparseCompute kernels={self.kernels!r}: allowed are {', '.join(SPARSE_KERNELS)}")
        self.mode = mode
        self.dense_grads = False
        self.refused: dict[str, str] = {}
        self.layers: dict[str, _Layer] = {}
        self._target_names = list(targets)
        self._cache: dict[tuple, dict[str, float]] = {}
        uses = _uses(model, targets)
        for name, param in targets.items():
            reason, owner = _refusal(name, param, uses.get(name, []), model)
            if reason is not None:
                self.refused[name] = reason
            else:
                module_name, module = owner
                self.layers[name] = _Layer(name, module_name, module, param, _kind(module))
        if mode == "sparse" and self.refused:
            lines = "\n".join(f"  {n}: {why}" for n, why in self.refused.items())
            raise SparsityConfigError(
                f"compute='sparse' cannot run these targets on sparse kernels:\n{lines}\n"
                "Use compute='auto' (they stay masked), exclude them from the targets, or compute='masked'."
            )
        missing = [n for n in self.layers if n not in masks]
        if missing:
            raise SparsityConfigError(f"SparseCompute: no mask for {', '.join(missing)}")
        csr_modules = {id(layer.module): n for n, layer in self.layers.items() if layer.kind in ("linear", "hf_conv1d")}
        for producer, link in chains.links(model, csr_modules).items():  # checked again at every call (chains.active)
            self.layers[producer].feeds, self.layers[producer].link = self.layers[link.consumer], link
        self.update_masks(masks)

    # ------------------------------------------------------------------ engine-facing
    def update_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Take new masks: rebuild the pattern of every layer named in ``masks`` (the changed ones; passing
        all is fine, each costs one pass over its mask). Names that are not sparse layers are ignored.

        The masks are kept by reference (no copy): call this again after changing one in place. In
        ``auto`` a rebuilt layer is timed again at its next training forward unless a layer of the same
        shape, density bucket, input rows, dtypes and thread count was timed already.
        """
        for name, mask in masks.items():
            layer = self.layers.get(name)
            if layer is None:
                continue
            if tuple(mask.shape) != tuple(layer.weight.shape) or mask.dtype != torch.bool or mask.device != layer.weight.device:
                raise SparsityConfigError(
                    f"mask of {name} is {tuple(mask.shape)} {mask.dtype} on {mask.device}; the weight is "
                    f"{tuple(layer.weight.shape)} on {layer.weight.device}, and masks are bool"
                )
            layer.mask = mask.detach()
            layer.pattern = SparsePattern(layer.mask, layer.transposed) if "csr" in self.kernels else None
            layer.semi = None
            if "2:4" in self.kernels and semi_structured_reason(layer.mask, layer.transposed) is None:
                layer.semi = SemiStructuredPattern(layer.mask, layer.transposed)
            if self.mode == "sparse":
                if layer.pattern is None and layer.semi is None:
                    raise SparsityConfigError(
                        f"compute='sparse': {name} has no kernel among kernels={self.kernels} "
                        f"({semi_structured_reason(layer.mask, layer.transposed)})"
                    )
                layer.choice, layer.reason = ("2:4" if layer.semi is not None else "csr"), "compute='sparse'"
            elif not layer.foreign:
                layer.choice, layer.reason, layer.timings = None, "", {}
            if layer.choice != "masked" and not layer.handles:
                _hook(self, layer)

    def dense_weight_grads(self, on: bool) -> None:
        """While on, the weight gradients of sparse layers are the full dense ``dY^T X`` (for a drop-and-grow
        update that ranks pruned positions by gradient); set it before that step's forward."""
        self.dense_grads = bool(on)

    def sparse_targets(self) -> list[str]:
        """The targets whose gradients the sparse kernels give with exact zeros at pruned positions."""
        if self.dense_grads:
            return []
        return [n for n, layer in self.layers.items() if layer.choice in SPARSE_KERNELS]

    def grads_to_mask(self) -> list[str]:
        """The targets whose gradients still need the mask this step: every target but :meth:`sparse_targets`."""
        exact = set(self.sparse_targets())
        return [n for n in self._target_names if n not in exact]

    def verify_grads(self) -> list[str]:
        """Names among :meth:`sparse_targets` whose ``.grad`` is non-zero at a pruned position (one pass over
        them): a weight also used outside its module's forward. Empty when all is well."""
        bad = []
        for name in self.sparse_targets():
            layer = self.layers[name]
            grad = layer.weight.grad
            if grad is not None and bool(grad.masked_select(~layer.mask).ne(0).any()):
                bad.append(name)
        return bad

    def table(self) -> list[dict]:
        """One row per target: what runs it and why; in ``auto`` with the measured milliseconds of a forward
        plus backward of the layer (``ms_masked``, ``ms_csr``, ``ms_2:4``) at the rows it first saw."""
        rows = []
        for name in self._target_names:
            if name in self.refused:
                rows.append({"layer": name, "choice": "masked", "reason": self.refused[name]})
                continue
            layer = self.layers[name]
            shape = "x".join(str(s) for s in layer.weight.shape)
            row = {
                "layer": name, "kind": layer.kind, "shape": shape, "sparsity": round(1 - layer.density, 4),
                "rows": layer.rows, "dtype": str(layer.weight.dtype).replace("torch.", ""),
                "threads": torch.get_num_threads(), "choice": layer.choice or "undecided", "reason": layer.reason,
            }  # fmt: skip
            if layer.feeds is not None:
                row["feeds"] = layer.feeds.name
            row.update({f"ms_{k}": round(v, 3) for k, v in layer.timings.items()})
            rows.append(row)
        return rows

    def detach(self) -> None:
        """Remove the hooks and drop the patterns; the model is exactly as before."""
        for layer in self.layers.values():
            _unhook(layer)
            if layer.pattern is not None:
                layer.pattern.release()
        self.layers = {}

    # ------------------------------------------------------------------ the forward
    def _run(self, layer: _Layer, func, args: tuple, kwargs: dict, x: Tensor, bias: Tensor | None):
        """Run the intercepted product of ``layer`` on ``x``: sparse, or ``func`` itself (masked dense)."""
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        training = torch.is_grad_enabled() and layer.weight.requires_grad
        if layer.choice is None:
            if not training:  # decide on a training forward, not on an evaluation one
                return func(*args, **kwargs)
            self._decide(layer, x, bias, dtype if autocast else None)
        if layer.choice == "masked":
            return func(*args, **kwargs)
        if layer.rows is None:
            layer.rows = _rows(layer, x)
        return _sparse_product(layer, layer.choice)(x, layer.weight, bias, self.dense_grads, dtype)

    def _decide(self, layer: _Layer, x: Tensor, bias: Tensor | None, autocast_dtype: torch.dtype | None) -> None:
        candidates = [k for k in ("csr", "2:4") if (layer.pattern if k == "csr" else layer.semi) is not None]
        w = layer.weight
        key = (
            x.device.type, x.dtype, w.dtype, autocast_dtype, tuple(w.shape), layer.kind, tuple(x.shape), x.stride(),
            x.requires_grad, bias is not None, calibrate.density_bucket(layer.density), torch.get_num_threads(),
            tuple(candidates),
        )  # fmt: skip
        if key not in self._cache:
            dtype = autocast_dtype or x.dtype
            products = {"masked": _DENSE_PRODUCTS[layer.kind]}
            for k in candidates:  # own patterns: the layer's gradient buffer is not touched
                pattern = SparsePattern(layer.mask, layer.transposed) if k == "csr" else layer.semi
                sparse = _sparse_product(layer, k)
                products[k] = lambda x, w, b, sparse=sparse, pattern=pattern: sparse(x, w, b, False, dtype, pattern)
            bias_features = None if bias is None else bias.numel()
            self._cache[key] = calibrate.time_layer(products, layer.mask, x, w.dtype, bias_features, autocast_dtype)
        layer.timings, layer.rows = self._cache[key], _rows(layer, x)
        layer.choice = calibrate.choose(layer.timings)
        fastest = min(layer.timings, key=layer.timings.get)
        layer.reason = "measured fastest" if layer.choice == fastest else f"{fastest} not {calibrate.MARGIN:.0%} faster than masked"

    def _foreign_use(self, layer: _Layer, func) -> None:
        what = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
        why = f"uses its weight in {what} inside {layer.module_name or 'the model'}'s forward, which the sparse kernels do not replace"
        if self.mode == "sparse":
            raise SparsityConfigError(f"compute='sparse': {layer.name} {why}; use compute='auto' or exclude it")
        layer.choice, layer.reason, layer.foreign = "masked", why, True


_DENSE_PRODUCTS = {  # the masked path's product for each kind of layer, from the stored weight
    "linear": lambda x, w, b: F.linear(x, w, b),
    "hf_conv1d": lambda x, w, b: F.linear(x, w.t(), b),
    "conv1x1": lambda x, w, b: F.conv2d(x, w, b),
}


def _sparse_product(layer: _Layer, kernel: str):
    """``f(x, weight, bias, dense_grad, dtype, pattern=layer's)``: the layer's product on ``kernel``."""
    if kernel == "2:4":
        fn = semi_structured_linear
    else:
        fn = csr_conv1x1 if layer.kind == "conv1x1" else csr_linear

    def product(x, weight, bias, dense_grad, dtype, pattern=None):
        if pattern is None:
            pattern = layer.semi if kernel == "2:4" else layer.pattern
        if fn is csr_linear:  # the layout of its output is decided per call (.chains)
            return csr_linear(x, weight, bias, pattern, dense_grad, dtype, layer.features_slowest)
        return fn(x, weight, bias, pattern, dense_grad, dtype)

    return product


def _rows(layer: _Layer, x: Tensor) -> int:
    """Rows of the layer's product: every input position (the channel dim of a convolution is not one)."""
    return x.numel() // (x.shape[-3] if layer.kind == "conv1x1" else x.shape[-1])


def _kind(module: nn.Module) -> str:
    if _is_hf_conv1d(module):
        return "hf_conv1d"
    return "conv1x1" if isinstance(module, nn.Conv2d) else "linear"


def _is_pointwise_conv(module: nn.Module) -> bool:
    """A ``Conv2d`` that is a matmul over channels: 1x1 kernel, stride 1, no padding, one group."""
    return (
        type(module).forward is nn.Conv2d.forward
        and tuple(module.kernel_size) == (1, 1)
        and tuple(module.stride) == (1, 1)
        and module.padding in ((0, 0), "valid", "same")
        and module.groups == 1
    )


def _hook(compute: SparseCompute, layer: _Layer) -> None:
    layer.mode = _Intercept(compute, layer)
    layer.handles = [
        layer.module.register_forward_pre_hook(_Enter(layer)),
        layer.module.register_forward_hook(_Exit(layer), always_call=True),
    ]


def _unhook(layer: _Layer) -> None:
    for handle in layer.handles:
        handle.remove()
    layer.handles = []


class _Intercept(TorchFunctionMode):
    """Active only inside one module's forward: routes the product with that module's weight to the sparse kernel."""

    def __init__(self, compute: SparseCompute, layer: _Layer):
        super().__init__()
        self.compute, self.layer = compute, layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = self.layer.weight
        if self.layer.choice != "masked":
            if func is F.linear and len(args) >= 2 and args[1] is weight and not self.layer.transposed:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return self.compute._run(self.layer, func, args, kwargs, args[0], bias)
            if func is torch.addmm and len(args) == 3 and args[2] is weight and not kwargs and self.layer.transposed:
                return self.compute._run(self.layer, func, args, kwargs, args[1], args[0])
            if func is F.conv2d and len(args) >= 2 and args[1] is weight and self.layer.kind == "conv1x1" and not kwargs:
                x = args[0]
                bias = args[2] if len(args) > 2 else None
                if x.dim() in (3, 4) and _pointwise_args(args[3:]):
                    return self.compute._run(self.layer, func, args, kwargs, x, bias)
            if _touches(weight, args, kwargs) and not _is_query(func):
                self.compute._foreign_use(self.layer, func)
        return func(*args, **kwargs)


def _pointwise_args(rest: tuple) -> bool:
    """``F.conv2d``'s stride, padding, dilation, groups (as ``nn.Conv2d`` passes them) describe a pointwise conv."""
    defaults = ((1, 1), (0, 0), (1, 1), 1)
    stride, padding, _dilation, groups = (*rest, *defaults[len(rest) :])

    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    return pair(stride) == (1, 1) and (padding in ("valid", "same") or pair(padding) == (0, 0)) and groups == 1


def _touches(weight: Tensor, args: tuple, kwargs: dict) -> bool:
    for a in (*args, *kwargs.values()):
        if a is weight or (isinstance(a, (list, tuple)) and any(b is weight for b in a)):
            return True
    return False


class _Enter:
    """Forward pre-hook: enters the layer's interception mode. Copies (deepcopy, pickle) are inert."""

    def __init__(self, layer: _Layer):
        self.layer = layer

    def __call__(self, module, args):
        if self.layer is not None:
            self.layer.mode.__enter__()

    def __getstate__(self):
        return {"layer": None}


class _Exit(_Enter):
    """Forward hook (always called, also when the forward raises): leaves the interception mode."""

    def __call__(self, module, args, output):
        if self.layer is not None:
            self.layer.mode.__exit__(None, None, None)
            if self.layer.choice == "masked":  # decided (auto): no interception cost from now on
                _unhook(self.layer)


def refusals(model: nn.Module, targets: Mapping[str, Tensor]) -> dict[str, str]:
    """``{target: reason}`` for every target the sparse kernels cannot take (what ``compute="sparse"`` refuses)."""
    uses = _uses(model, targets)
    found = {name: _refusal(name, param, uses.get(name, []), model)[0] for name, param in targets.items()}
    return {name: why for name, why in found.items() if why is not None}


def _uses(model: nn.Module, targets: Mapping[str, Tensor]) -> dict[str, list[tuple[str, nn.Module, str]]]:
    """For each target: every ``(module name, module, attribute)`` that holds it as a parameter."""
    by_id = {id(p): n for n, p in targets.items()}
    uses: dict[str, list] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None and id(p) in by_id:
                entry = (module_name, module, attr)
                if entry not in uses.setdefault(by_id[id(p)], []):
                    uses[by_id[id(p)]].append(entry)
    return uses


def _refusal(name: str, param: Tensor, uses: list, model: nn.Module) -> tuple[str | None, tuple[str, nn.Module] | None]:
    """``(reason, None)`` if the target cannot run on the sparse kernels, else ``(None, (module name, module))``."""
    if not uses:
        return "not a parameter of this model", None
    module_name, module, attr = uses[0]
    kinds = {(id(m), a) for _, m, a in uses}
    if len(kinds) > 1 or len({id(m) for _, m, _ in uses}) > 1:
        where = ", ".join(f"{type(m).__name__} {n or '<root>'}.{a}" for n, m, a in uses)
        return f"shared by several modules ({where}); the kernels replace one module's product only", None
    for ancestor_name, ancestor in model.named_modules():
        if isinstance(ancestor, nn.MultiheadAttention) and (module is ancestor or module_name.startswith(ancestor_name + ".")):
            return (
                f"inside nn.MultiheadAttention {ancestor_name or '<root>'}: its forward passes in_proj_weight and "
                "out_proj.weight to F.multi_head_attention_forward, which never calls the projection modules"
            ), None
    if isinstance(param, DTensor):
        return "sharded (DTensor) parameter: the sparse kernels need the whole weight", None
    if ".parametrizations." in f".{name}." or module_name.endswith("parametrizations") or type(module).__name__ == "ParametrizationList":
        return "the layer's weight is computed by a parametrization", None
    if isinstance(module, nn.modules.conv._ConvNd) and not _is_pointwise_conv(module):
        return (
            f"{type(module).__name__} with kernel {tuple(module.kernel_size)}, stride {tuple(module.stride)}, "
            f"groups {module.groups}: only pointwise Conv2d (1x1, stride 1, no padding, one group) is taken; "
            "other convolutions stay masked (im2col + CSR measured slower than dense, docs/sparse_compute.md)"
        ), None
    if attr != "weight" or not (isinstance(module, (nn.Linear, nn.Conv2d)) or _is_hf_conv1d(module)):
        return f"the {attr} of {type(module).__name__}: only nn.Linear, Hugging Face Conv1D and 1x1 Conv2d weights are taken", None
    if param.dim() != (4 if isinstance(module, nn.Conv2d) else 2) or not param.is_floating_point() or not param.is_contiguous():
        shape = "4-D" if isinstance(module, nn.Conv2d) else "2-D"
        return f"weight is {param.dim()}-D {param.dtype}{'' if param.is_contiguous() else ', not contiguous'}; needs a contiguous {shape} float", None
    if param.device.type not in ("cpu", "cuda"):
        return f"on {param.device}: sparse kernels run on cpu and cuda", None
    return None, (module_name, module)
