"""Export a sparse-trained model: permanent zeros, compressed checkpoints, sparse inference.

Plain torch only (no Lightning; the bit packing, layouts and N:M masks are :mod:`sparsetrain.core`'s); see
``docs/export.md``.

* :func:`make_permanent` / :func:`permanent_state_dict`: masked weights exactly ``+0.0``, nothing
  of sparsetrain on the model; the state dict loads with plain torch, timm or torchvision.
* :func:`save_compressed` / :func:`load_compressed`: a ``torch.save``'d dict (loadable with
  ``weights_only=True``) storing sparse floating tensors as a bit-packed mask plus their values.
* :func:`to_sparse_inference`: ``nn.Linear`` -> :class:`SparseLinear` (CSR weight) on the CPU
  where it is faster, for inference only.
* :func:`to_semi_structured`: 2:4 sparse ``nn.Linear`` weights -> ``torch.sparse`` semi-structured
  tensors (CUDA, compute capability >= 8.0).
* :func:`is_n_m_sparse`, :func:`n_m_mask`, :func:`n_m_report`: N:M checks along each layer's real input
  dim (:mod:`sparsetrain.core.layouts`: Hugging Face ``Conv1D`` along dim 0, convolutions over input
  channels at each kernel position by default).
"""

from __future__ import annotations

import io
import logging
import os
import statistics
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import IO, Any

import torch
from torch import Tensor, nn

from sparsetrain.core.bits import pack_bits, unpack_bits
from sparsetrain.core.layouts import NM_LAYOUTS, ROWS, Grouping, layout_of
from sparsetrain.core.nm import NMStructure

log = logging.getLogger(__name__)

FORMAT = "sparsetrain.compressed"
VERSION = 1
BITORDER = "little"  # bit i of byte j holds element 8 * j + i (numpy.packbits(..., bitorder="little"))

__all__ = [
    "FORMAT",
    "VERSION",
    "SparseLinear",
    "is_n_m_sparse",
    "load_compressed",
    "make_permanent",
    "median_ms",
    "n_m_mask",
    "n_m_report",
    "pack_bits",
    "permanent_state_dict",
    "save_compressed",
    "to_semi_structured",
    "to_sparse_inference",
    "unpack_bits",
]


# ----------------------------------------------------------------------------- permanent zeros
def _ours(obj: Any) -> bool:
    """Whether a hook function or parametrization object comes from sparsetrain."""
    owner = getattr(obj, "__self__", obj)
    for thing in (obj, owner, type(owner)):
        if (getattr(thing, "__module__", None) or "").startswith("sparsetrain"):
            return True
    return False


def _remove_our_hooks(model: nn.Module) -> list[str]:
    """Remove forward (pre-)hooks and parametrizations that sparsetrain put on ``model``; returns what went."""
    removed = []
    for name, module in model.named_modules():
        for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_state_dict_hooks"):
            hooks = getattr(module, attr, None) or {}
            for key in [k for k, h in hooks.items() if _ours(h)]:
                del hooks[key]
                removed.append(f"{name or '<root>'}.{attr}")
        plist = getattr(module, "parametrizations", None)
        if plist is not None:
            for tensor_name in list(plist.keys()):
                if any(_ours(p) for p in plist[tensor_name]):
                    torch.nn.utils.parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
                    removed.append(f"{name or '<root>'}.parametrizations.{tensor_name}")
    return removed


def _masked_tensors(named: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> list[tuple[str, Tensor, Tensor]]:
    """``(name, tensor, mask)`` for every mask, with names matched after dropping ``_orig_mod.``."""
    clean = {n.replace("_orig_mod.", ""): t for n, t in named.items()}
    out = []
    for name, mask in masks.items():
        tensor = named.get(name, clean.get(name.replace("_orig_mod.", "")))
        if tensor is None:
            raise KeyError(
                f"mask {name!r} names no tensor of the model; names look like {', '.join(list(named)[:5])}. "
                "Masks are keyed by the names of the module the callback trained (the LightningModule)."
            )
        if mask.shape != tensor.shape:
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, the tensor {tuple(tensor.shape)}")
        out.append((name, tensor, mask.to(device=tensor.device, dtype=torch.bool)))
    return out


@torch.no_grad()
def make_permanent(model: nn.Module, masks: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Make the sparsity of ``model`` permanent, in place, and return ``model``.

    * with ``masks`` (e.g. ``callback.masks``): ``w.masked_fill_(~mask, 0)`` for every masked
      parameter, so every pruned weight is exactly ``+0.0``;
    * without: every zero of a floating parameter (``w == 0``, so also ``-0.0``, which an in-place
      multiply by a 0 mask leaves on negative weights) becomes ``+0.0``. Values compare equal;
      only the sign bit of zeros changes, so forward outputs are unchanged.

    Forward hooks and parametrizations that came from sparsetrain (the callback adds forward
    pre-hooks only during stochastic training batches) are removed; none should exist. Nothing
    else on the model changes: no keys are added to or removed from ``model.state_dict()``, so
    ``torch.save(model.state_dict(), f)`` loads into the plain architecture (torch, timm,
    torchvision) without sparsetrain installed.
    """
    removed = _remove_our_hooks(model)
    if removed:
        warnings.warn(f"make_permanent removed sparsetrain hooks left on the model: {', '.join(removed)}", stacklevel=2)
    if masks is not None:
        named = dict(model.named_parameters(remove_duplicate=False))
        named.update({n: b for n, b in model.named_buffers(remove_duplicate=False)})
        for _, tensor, mask in _masked_tensors(named, masks):
            tensor.masked_fill_(~mask, 0)
    else:
        for p in model.parameters():
            if p.is_floating_point() and p.layout == torch.strided:
                p.masked_fill_(p == 0, 0)  # -0.0 -> +0.0
    return model


@torch.no_grad()
def permanent_state_dict(model: nn.Module | Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> OrderedDict:
    """A detached copy of ``model.state_dict()`` (or of a state dict) with ``masks`` applied
    (pruned weights ``+0.0``) and every floating ``-0.0`` written as ``+0.0``; ``model`` is not changed."""
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    out = OrderedDict((k, v.detach().clone() if isinstance(v, Tensor) else v) for k, v in sd.items())
    if hasattr(sd, "_metadata"):
        out._metadata = sd._metadata  # type: ignore[attr-defined]
    if masks is not None:
        for _, tensor, mask in _masked_tensors(out, masks):
            tensor.masked_fill_(~mask, 0)
    for v in out.values():
        if isinstance(v, Tensor) and v.is_floating_point() and v.layout == torch.strided:
            v.masked_fill_(v == 0, 0)
    return out


# ----------------------------------------------------------------------------- compressed checkpoints
def _alias_key(t: Tensor) -> tuple | None:
    if t.layout != torch.strided or t.numel() == 0:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (t.device, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


@torch.no_grad()
def _encode(sd: Mapping[str, Any], masks: Mapping[str, Tensor] | None, min_sparsity: float) -> dict:
    named_masks = {}
    if masks:
        named_masks = {n: m for n, _, m in _masked_tensors({k: v for k, v in sd.items() if isinstance(v, Tensor)}, masks)}
    tensors: dict[str, dict] = {}
    seen: dict[tuple, str] = {}
    outside = []
    for name, value in sd.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name!r} is a {type(value).__name__}; a state dict holds tensors only")
        key = _alias_key(value)
        if key is not None and key in seen:
            tensors[name] = {"kind": "alias", "of": seen[key]}
            continue
        if key is not None:
            seen[key] = name
        t = value.detach()
        sparse = False
        if t.is_floating_point() and t.layout == torch.strided and t.numel() > 0:
            zero = t == 0
            if name in named_masks:
                pruned = zero & ~named_masks[name]
                nonzero_outside = int((~zero & ~named_masks[name]).sum())
                if nonzero_outside:
                    outside.append(f"{name} ({nonzero_outside})")
                sparse = True
            else:
                pruned = zero
                sparse = int(zero.sum()) >= min_sparsity * t.numel()
        if not sparse:
            tensors[name] = {"kind": "dense", "tensor": t.cpu() if t.device.type != "cpu" else t}
            continue
        keep = ~pruned.reshape(-1)
        tensors[name] = {
            "kind": "bitmask",
            "shape": list(t.shape),
            "mask": pack_bits(keep).cpu(),
            "values": t.reshape(-1)[keep].cpu(),  # original dtype, exact bits (also -0.0, NaN payloads)
        }
    if outside:
        warnings.warn(
            "save_compressed: weights outside their mask are non-zero and are stored as they are: "
            f"{', '.join(outside[:6])}. Call make_permanent(model, masks) first to zero them.",
            stacklevel=3,
        )
    metadata = {}
    for prefix, meta in (getattr(sd, "_metadata", None) or {}).items():
        if isinstance(meta, Mapping):
            metadata[prefix] = {k: v for k, v in meta.items() if isinstance(k, str) and isinstance(v, (int, float, str, bool))}
    return {"format": FORMAT, "version": VERSION, "bitorder": BITORDER, "tensors": tensors, "metadata": metadata}


def save_compressed(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    file: str | os.PathLike | IO[bytes],
    masks: Mapping[str, Tensor] | None = None,
    min_sparsity: float = 0.5,
) -> None:
    """Save a state dict with its sparse floating tensors bit-packed.

    A floating tensor is stored sparse when it is in ``masks`` or when at least
    ``min_sparsity`` of its entries are zero: a uint8 bit mask (1 = a stored value, 0 = ``+0.0``;
    see :func:`pack_bits` for the bit order) and the stored values in the tensor's own dtype.
    The positions that count as zeros are ``w == 0`` (``+0.0`` and ``-0.0``), and, for a tensor
    in ``masks``, only those outside the mask; every other position keeps its exact value. So
    ``load_compressed`` returns tensors ``torch.equal`` to the saved ones with the same dtype
    and shape; they are bit-identical except that a pruned ``-0.0`` comes back as ``+0.0``
    (:func:`make_permanent` writes pruned zeros as ``+0.0``, after which the round trip is
    bit-exact). Values are never changed by saving: a weight outside its mask that is not zero is stored.

    Other tensors (integer, bool, dense floating) are stored as they are; tensors sharing
    memory (tied weights) are stored once. Everything goes to CPU. The file is a ``torch.save``
    of plain dicts, lists, strings, ints and tensors: ``torch.load(file, weights_only=True)`` reads it.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity={min_sparsity} must be in [0, 1]")
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    torch.save(_encode(sd, masks, min_sparsity), file)


def decode_compressed(payload: Mapping[str, Any]) -> OrderedDict:
    """The state dict held by a loaded compressed payload (what :func:`load_compressed` returns)."""
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise ValueError("not a sparsetrain compressed checkpoint (no 'format': 'sparsetrain.compressed')")
    version = payload.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(f"compressed checkpoint version {version!r}; this sparsetrain reads up to {VERSION}")
    if payload.get("bitorder", BITORDER) != BITORDER:
        raise ValueError(f"unknown bit order {payload.get('bitorder')!r}")
    out: OrderedDict[str, Tensor] = OrderedDict()
    for name, entry in payload["tensors"].items():
        kind = entry["kind"]
        if kind == "dense":
            out[name] = entry["tensor"]
        elif kind == "alias":
            out[name] = out[entry["of"]]
        elif kind == "bitmask":
            values, shape = entry["values"], entry["shape"]
            numel = 1
            for s in shape:
                numel *= s
            keep = unpack_bits(entry["mask"], numel).to(values.device)
            flat = torch.zeros(numel, dtype=values.dtype, device=values.device)
            flat[keep] = values
            out[name] = flat.view(shape)
        else:
            raise ValueError(f"{name!r}: unknown entry kind {kind!r}")
    metadata = payload.get("metadata") or {}
    if metadata:
        out._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())  # type: ignore[attr-defined]
    return out


def load_compressed(
    file: str | os.PathLike | IO[bytes],
    model: nn.Module | None = None,
    map_location: Any = "cpu",
    strict: bool = True,
) -> OrderedDict:
    """Read a file written by :func:`save_compressed` (with ``weights_only=True``) and return
    its state dict; with ``model``, also ``model.load_state_dict(state_dict, strict=strict)``."""
    sd = decode_compressed(torch.load(file, map_location=map_location, weights_only=True))
    if model is not None:
        model.load_state_dict(sd, strict=strict)
    return sd


def compressed_size(model_or_state_dict: nn.Module | Mapping[str, Tensor], **kwargs) -> int:
    """Bytes :func:`save_compressed` would write (keyword arguments as there)."""
    buffer = io.BytesIO()
    save_compressed(model_or_state_dict, buffer, **kwargs)
    return buffer.getbuffer().nbytes


# ----------------------------------------------------------------------------- CPU sparse inference
def _to_csr(t: Tensor) -> Tensor:
    """CSR with int32 indices where they fit: same results, 1.3-2x faster products than int64
    (measured, MKL, 4096x4096 at 80-95 % sparsity), and 4 bytes less per non-zero."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = t.to_sparse_csr()
        if max(csr._nnz(), *t.shape) < 2**31 - 1:
            csr = torch.sparse_csr_tensor(
                csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32), csr.values(), t.shape,
                check_invariants=False,  # built from a valid CSR
            )
        return csr


class SparseLinear(nn.Module):
    """``nn.Linear`` for inference with its weight as a ``torch.sparse_csr`` tensor (a buffer).

    ``forward(x)`` computes ``torch.addmm(bias[:, None], W_csr, x2d.T).T`` (``x2d`` is ``x``
    flattened to ``(-1, in_features)``), the fastest CSR product on the CPU in torch 2.x
    (``x @ W_csr.T`` is ~40x slower), then copies the result to a contiguous ``(..., out_features)``.
    ``F.linear`` with a CSR weight fails under ``torch.inference_mode()`` (torch 2.14) and is
    slower, so it is not used. Indices are int32 where they fit (faster than int64). Inference only: no gradient reaches the weight. CPU, float32 or
    float64 (torch has no bf16/fp16 CSR matmul on the CPU). ``to_linear()`` gives the dense layer back.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("weight", _to_csr(weight))
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)
        self.timing: dict[str, float] | None = None  # dense_ms / sparse_ms when chosen by timing

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        return cls(linear)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.bias is None:
            y = torch.mm(self.weight, x2.t())
        else:
            y = torch.addmm(self.bias.unsqueeze(1), self.weight, x2.t())
        # contiguous: a transposed (column-major) result makes the next ops slower (measured on
        # ViT-Tiny: qkv's reshape/permute, attention), which a per-layer timing would not see
        return y.t().contiguous().reshape(*lead, self.out_features)

    def to_linear(self) -> nn.Linear:
        dense = self.weight.to_dense()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=dense.device, dtype=dense.dtype)
        with torch.no_grad():
            linear.weight.copy_(dense)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        nnz = self.weight._nnz()
        density = nnz / max(1, self.in_features * self.out_features)
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, density={density:.4f}"


def median_ms(fn: Callable[[], Any], repeats: int = 7, min_s: float = 2e-3) -> float:
    """Median milliseconds of one ``fn()`` over ``repeats`` runs (each looping long enough to time)."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_s / once))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        runs.append((time.perf_counter() - t0) / inner)
    return statistics.median(runs) * 1e3


def _csr_supported(dtype: torch.dtype) -> bool:
    try:
        w = _to_csr(torch.eye(2, dtype=dtype))
        with torch.inference_mode():
            torch.addmm(torch.zeros(2, 1, dtype=dtype), w, torch.ones(2, 3, dtype=dtype))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _layer_inputs(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, Tensor]:
    captured: dict[str, Tensor] = {}
    handles = []
    for name in names:
        def hook(module, args, name=name):
            captured.setdefault(name, args[0].detach())
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            if isinstance(example_inputs, Mapping):
                model(**example_inputs)
            elif isinstance(example_inputs, tuple):
                model(*example_inputs)
            else:
                model(example_inputs)
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def to_sparse_inference(
    model: nn.Module,
    min_sparsity: float = 0.8,
    benchmark: bool = True,
    batch_size: int = 1,
    example_inputs: Any = None,
    repeats: int = 7,
    report: dict | None = None,
) -> nn.Module:
    """Replace sparse ``nn.Linear`` layers of ``model`` by :class:`SparseLinear`, in place; returns ``model``.

    A CPU ``nn.Linear`` with a float32/float64 weight is a candidate when at least
    ``min_sparsity`` of its weights are zero. With ``benchmark=False`` every candidate is
    replaced. With ``benchmark=True`` (default) each candidate is timed where it is, dense
    ``F.linear`` against the CSR product, under ``torch.inference_mode()`` (median of
    ``repeats``), and replaced only if the CSR product is faster. The timing input is the
    layer's real input when ``example_inputs`` is given (what ``model`` is called with: a
    tensor, a tuple of arguments or a dict of keywords; captured with temporary hooks), else
    ``torch.randn(batch_size, in_features)``: for a transformer give ``example_inputs``, its
    Linear layers see ``batch * tokens`` rows. Timings depend on the machine and thread count.

    ``report``, if a dict, receives ``{layer: {"sparsity", "dense_ms", "sparse_ms", "replaced"}}``
    for every candidate (times ``None`` without benchmark). For inference only.
    """
    was_training = model.training
    model.eval()
    candidates: list[tuple[str, nn.Linear, float]] = []
    supported: dict[torch.dtype, bool] = {}
    inside_mha = {
        f"{n}.{c}" if n else c
        for n, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)
        for c, _ in mod.named_children()
    }  # MultiheadAttention reads out_proj.weight itself, never calls out_proj
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward or name in inside_mha:
            continue
        w = module.weight
        if w.device.type != "cpu" or w.layout != torch.strided:
            continue
        if w.dtype not in supported:
            supported[w.dtype] = w.is_floating_point() and _csr_supported(w.dtype)
        if not supported[w.dtype]:
            continue
        sparsity = float((w == 0).sum()) / max(1, w.numel())
        if sparsity >= min_sparsity:
            candidates.append((name, module, sparsity))
    inputs: dict[str, Tensor] = {}
    if benchmark and example_inputs is not None and candidates:
        inputs = _layer_inputs(model, [n for n, _, _ in candidates], example_inputs)
    for name, linear, sparsity in candidates:
        sparse = SparseLinear(linear)
        dense_ms = sparse_ms = None
        replace = True
        if benchmark:
            x = inputs.get(name)
            if x is None:
                x = torch.randn(batch_size, linear.in_features, dtype=linear.weight.dtype)
            with torch.inference_mode():
                dense_ms = median_ms(lambda f=linear, x=x: f(x), repeats)
                sparse_ms = median_ms(lambda f=sparse, x=x: f(x), repeats)
            replace = sparse_ms < dense_ms
            sparse.timing = {"dense_ms": dense_ms, "sparse_ms": sparse_ms}
        if replace:
            _set_module(model, name, sparse)
        log.info(
            "%s: sparsity %.3f, %s%s", name, sparsity, "CSR" if replace else "stays dense",
            "" if dense_ms is None else f" (dense {dense_ms:.3f} ms, CSR {sparse_ms:.3f} ms)",
        )  # fmt: skip
        if report is not None:
            report[name] = {"sparsity": sparsity, "dense_ms": dense_ms, "sparse_ms": sparse_ms, "replaced": replace}
    model.train(was_training)
    return model


# ----------------------------------------------------------------------------- 2:4 on CUDA
# The N:M reading of a layer's weight: the rule of sparsetrain.core.layouts, restated here because this module
# needs only torch (tests/test_layouts.py checks that both give the same groups for every kind of layer).
def _grouping(weight: Tensor | nn.Module, nm_layout: str) -> tuple[Tensor, Grouping]:
    """The weight and its N:M reading: a module's by its layout (:mod:`sparsetrain.core.layouts`), a bare tensor's
    as the rows of ``weight.reshape(out, -1)``."""
    if nm_layout not in NM_LAYOUTS:
        raise ValueError(f"nm_layout={nm_layout!r}; allowed: {', '.join(map(repr, NM_LAYOUTS))}")
    module = weight if isinstance(weight, nn.Module) else None
    w = (module.weight if module is not None else weight).detach()
    return w, (ROWS if module is None else layout_of(module)).grouping(tuple(w.shape), nm_layout)


def is_n_m_sparse(weight: Tensor | nn.Module, n: int = 2, m: int = 4, nm_layout: str = "channels") -> bool:
    """Whether every group of ``m`` consecutive weights along the input dim holds at most ``n`` non-zeros.

    ``weight``: a layer, read along its real input dim: ``nn.Linear`` along dim 1, Hugging Face ``Conv1D``
    (weight ``(in, out)``) along dim 0, a convolution over its input channels at each kernel position
    (``nm_layout="channels"``: NVIDIA's sparse convolutions) or over ``weight.reshape(out, -1)`` (``"flat"``),
    a transposed convolution over its input channels (dim 0); or a tensor, read as ``weight.reshape(out, -1)``
    (a Linear weight). False when the input size is not a multiple of ``m``.
    """
    w, grouping = _grouping(weight, nm_layout)
    if not grouping.fits(m):
        return False
    return bool((NMStructure(n, m, grouping).group_counts(w != 0) <= n).all())


def n_m_mask(weight: Tensor | nn.Module, n: int = 2, m: int = 4, nm_layout: str = "channels") -> Tensor:
    """Mask keeping the ``n`` largest ``|w|`` of every group of ``m`` along the input dim (read as in
    :func:`is_n_m_sparse`; ties to the lower position, the rule of training's N:M masks), shaped like the weight."""
    w, grouping = _grouping(weight, nm_layout)
    if w.dim() < 2:
        raise ValueError(f"N:M sparsity needs a weight of 2 or more dims, got shape {tuple(w.shape)}")
    if not grouping.fits(m):
        raise ValueError(f"input size {grouping.run} ({grouping.name}) is not a multiple of m={m}")
    return NMStructure(n, m, grouping).mask(w.abs().float())


@torch.no_grad()
def n_m_report(model: nn.Module, n: int = 2, m: int = 4, nm_layout: str = "channels") -> dict[str, dict]:
    """Check every ``Linear``, convolution, transposed convolution and Hugging Face ``Conv1D`` of ``model``
    for N:M along its real input dim, and say how each was read.

    ``{layer: {"layout", "fits", "groups", "over_n", "n_m"}}``: the reading (``"linear"``, ``"hf_conv1d (in,
    out)"``, ``"conv channels"``, ...), whether its input size is a multiple of ``m``, the number of groups, how
    many hold more than ``n`` non-zeros, and whether the layer is N:M (``over_n == 0``; ``False`` when it does
    not fit). ``nm_layout``: ``channels`` (the layout of NVIDIA's sparse convolutions: apex ASP, TensorRT) or
    ``flat``, as the model was trained with (``structure=..., nm_layout=...``).
    """
    report = {}
    for name, module in model.named_modules():
        if layout_of(module) is ROWS or not isinstance(getattr(module, "weight", None), Tensor):
            continue
        w, grouping = _grouping(module, nm_layout)
        fits = grouping.fits(m)
        over = int((NMStructure(n, m, grouping).group_counts(w != 0) > n).sum()) if fits else None
        report[name] = {"layout": grouping.name, "fits": fits, "groups": w.numel() // m if fits else 0, "over_n": over, "n_m": over == 0}
    return report


def _semi_structured_backend():
    if not torch.cuda.is_available():
        raise RuntimeError("to_semi_structured needs CUDA: 2:4 semi-structured sparse kernels exist only for CUDA GPUs")
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        raise RuntimeError("to_semi_structured needs CUDA and torch.sparse.to_sparse_semi_structured (torch >= 2.1)")
    if torch.cuda.get_device_capability() < (8, 0):
        raise RuntimeError(
            f"to_semi_structured needs CUDA compute capability >= 8.0 (Ampere or newer) for 2:4 sparse kernels; "
            f"this GPU has {torch.cuda.get_device_capability()}"
        )
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        return torch.sparse.to_sparse_semi_structured
    return torch.sparse.SparseSemiStructuredTensorCUTLASS.from_dense


@torch.no_grad()
def to_semi_structured(model: nn.Module, report: dict | None = None) -> nn.Module:
    """Give every CUDA ``nn.Linear`` whose weight is exactly 2:4 sparse along the input dim a
    ``torch.sparse`` semi-structured weight (cuSPARSELt where available, else CUTLASS), in place.

    Needs CUDA with compute capability >= 8.0; raises ``RuntimeError("... needs CUDA ...")``
    otherwise. Layers that are not 2:4, not on CUDA, or whose dtype/shape the kernels reject
    (fp16/bf16/int8/fp32 with both dims multiples of the kernel's block, e.g. 32x64 for fp16)
    stay dense; ``report`` (a dict) receives ``{layer: "2:4" | reason}``. Inference only.
    """
    convert = _semi_structured_backend()
    converted, rejected = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight
        if not w.is_cuda:
            why = f"on {w.device}, not CUDA"
        elif not is_n_m_sparse(w, 2, 4):
            why = "not 2:4 sparse"
        else:
            try:
                module.weight = nn.Parameter(convert(w.detach().contiguous()), requires_grad=False)
                why = "2:4"
                converted.append(name)
            except (RuntimeError, ValueError) as e:
                why = f"rejected by the kernel: {e}"
                rejected.append(name)
        if report is not None:
            report[name] = why
    if rejected:
        warnings.warn(f"to_semi_structured: 2:4 layers left dense (dtype/shape not supported): {', '.join(rejected[:8])}", stacklevel=2)
    if not converted:
        warnings.warn("to_semi_structured: no Linear layer was converted (none is a 2:4 sparse CUDA weight)", stacklevel=2)
    return model
