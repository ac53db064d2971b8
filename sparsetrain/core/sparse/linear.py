"""Training kernels for ``y = x @ (W * mask)^T + b`` that read ``W`` only at kept positions.

:func:`csr_linear` (any device): with ``M`` the linear weight ``(out, in)`` and ``X`` the input
flattened to ``(rows, in)`` (any leading dims),

* forward: ``Y^T = b 1^T + M_csr @ X^T``, ``M_csr`` the CSR matrix of the kept values of the dense
  parameter (gathered through the fixed pattern, O(nnz)); ``torch.addmm`` with a CSR first operand
  (MKL on the CPU, cuSPARSE on CUDA);
* input gradient: ``dX^T = M^T_csr @ dY^T`` through the transposed pattern (same kernel);
* weight gradient: ``dM[i, j] = sum_r dY[r, i] X[r, j]`` only at kept ``(i, j)``, a sampled dense-dense
  product (``torch.sparse.sampled_addmm``), written into a dense gradient with exact zeros at pruned
  positions (:meth:`SparsePattern.weight_grad`); ``dense_grad=True`` gives the full ``dY^T @ X``
  instead (for a drop-and-grow update that ranks pruned positions by gradient);
* bias gradient: ``db = sum_r dY[r]``.

Layouts: the CSR product reads its dense operand row-major and computes the transpose of what a layer
returns, so ``X^T`` and ``dY^T`` are made once per layer (one reordering copy each, none when the tensor is
already stored that way) and serve every product, and ``Y`` and ``dX`` are reordered into the row-major
layout ``nn.Linear`` gives (one copy each). ``features_slowest=True`` skips the copy of ``Y``: the result is
stored as ``Y^T``, for a consumer known to take any layout (:mod:`.chains`); the next CSR layer then reads
it without a copy, and the input gradient always comes back in the layout of the input.

:func:`csr_conv1x1` runs a 1x1 convolution as that product on the channels-last view of its input.

The parameter, its ``.grad`` and the optimizer see dense tensors of the usual shapes. Where the
device has no sparse kernel for the dtype (bf16/fp16 on the CPU: MKL's CSR product and torch's
CPU ``sampled_addmm`` are fp32/fp64 only) the sparse products run in float32 on the kept values
and the results are cast back (:func:`kernel_dtype`).

:func:`semi_structured_linear` (CUDA, compute capability >= 8.0): 2:4 masks with
``torch.sparse.to_sparse_semi_structured``; see its docstring for which products are sparse.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from sparsetrain.core.sparse.pattern import SparsePattern

_KERNEL_DTYPES: dict[tuple[str, torch.dtype], torch.dtype] = {}


def kernel_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the sparse products run in for ``dtype`` on ``device``: float32 and float64 as they are;
    other dtypes as they are on CUDA where the CSR product and ``sampled_addmm`` both take them (probed
    once per dtype on a 32x32 matrix), else float32 (always on the CPU: MKL's CSR product takes only
    float and double; a tiny identity matrix takes another path that accepts bf16, so it proves nothing)."""
    key = (device.type, dtype)
    if key not in _KERNEL_DTYPES:
        native = dtype in (torch.float32, torch.float64) or (device.type == "cuda" and _cuda_sparse_ops_accept(device, dtype))
        _KERNEL_DTYPES[key] = dtype if native else torch.float32
    return _KERNEL_DTYPES[key]


def _cuda_sparse_ops_accept(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        gen = torch.Generator(device).manual_seed(0)
        mask = torch.rand(32, 32, generator=gen, device=device) < 0.25
        csr = (torch.ones(32, 32, device=device) * mask).to(dtype).to_sparse_csr()
        dense = torch.ones(32, 32, dtype=dtype, device=device)
        torch.addmm(dense, csr, dense)
        torch.sparse.sampled_addmm(csr, dense, dense, beta=0.0)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _without_autocast(fn):
    """Run an autograd function's forward or backward with autocast off: the kernels choose their dtypes."""

    @functools.wraps(fn)
    def wrapper(ctx, tensor, *args):
        with torch.autocast(tensor.device.type, enabled=False):
            return fn(ctx, tensor, *args)

    return wrapper


def _row_major(y2: Tensor, leading: torch.Size, dtype: torch.dtype) -> Tensor:
    """``y2`` (``(rows, features)``, any strides) as the ``(*leading, features)`` result ``nn.Linear`` gives:
    row-major (``.view`` on it works, attention kernels get a contiguous last dim) and its own base, not a view
    (autograd allows an in-place op after the layer, ``nn.ReLU(inplace=True)``). One copy in ``dtype``; when
    that is narrower (float32 kernels, bf16 result) the cast comes first, in ``y2``'s own layout, so the
    reordering copy moves the narrow values and takes torch's blocked transpose (a cast and a reorder in one
    strided copy measured 3x slower)."""
    y = torch.empty((*leading, y2.shape[1]), dtype=dtype, device=y2.device)
    if y2.dtype != dtype and y2.element_size() > y.element_size():
        y2 = y2.to(dtype)  # keeps y2's strides
    y.view(-1, y2.shape[1]).copy_(y2)
    return y


def _transposed(a: Tensor, dtype: torch.dtype) -> Tensor:
    """``a^T`` (``a`` 2-D) as a contiguous tensor in ``dtype``: one reordering copy (none if ``a`` is a transposed
    view already), done in the narrower of the two dtypes (see :func:`_row_major`). The CSR product reads its
    dense operand row-major (a transposed operand costs MKL a copy of its own), and ``sampled_addmm`` on the
    CPU takes its first operand and the transpose of its second contiguous, so ``X^T`` and ``dY^T`` made once
    serve every product of a layer."""
    at = a.t()
    if not at.is_contiguous():
        if at.dtype != dtype and at.element_size() > torch.empty((), dtype=dtype).element_size():
            at = at.to(dtype)
        at = at.contiguous()
    return at.to(dtype)


def _not_a_view(y: Tensor) -> Tensor:
    """The output of an autograd Function must not be a view: an in-place op on it (``nn.ReLU(inplace=True)``
    after the layer) is refused by autograd. A view is copied, row-major."""
    return y.clone(memory_format=torch.contiguous_format) if y._is_view() else y


class _CsrLinear(torch.autograd.Function):
    @staticmethod
    @_without_autocast
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, pattern: SparsePattern, dense_grad: bool, dtype: torch.dtype,
                features_slowest: bool):  # fmt: skip
        kdt = kernel_dtype(x.device, dtype)
        x2 = x.reshape(-1, pattern.in_features)
        xt = _transposed(x2, kdt)  # X^T: the CSR product's operand, and the weight gradient's
        values = pattern.values(weight).to(kdt)
        m = pattern.csr(values)
        bias_column = None if bias is None else bias.to(kdt).unsqueeze(1)
        y = _result(lambda out: _csr_mm(m, xt, bias_column, out), x.shape[:-1], pattern.out_features, dtype, kdt, features_slowest, x.device)
        ctx.save_for_backward(xt, values, weight)
        ctx.pattern, ctx.dense_grad, ctx.x_shape, ctx.x_dtype = pattern, dense_grad, x.shape, x.dtype
        ctx.x_features_slowest = _is_features_slowest(x2)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @_without_autocast
    def backward(ctx, dy: Tensor):
        xt, values, weight = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        dyt = _transposed(dy.reshape(-1, pattern.out_features), xt.dtype)  # dY^T
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # in the input's layout: row-major, or features-slowest from a linked layer
            mt = pattern.csr_t(values)
            dx = _result(lambda out: _csr_mm(mt, dyt, None, out), ctx.x_shape[:-1], pattern.in_features, ctx.x_dtype, xt.dtype,
                         ctx.x_features_slowest, dyt.device)  # fmt: skip
        if ctx.needs_input_grad[1]:
            if ctx.dense_grad:
                full = xt @ dyt.t() if pattern.transposed else dyt @ xt.t()  # the stored layout, (in, out) or (out, in)
                dw = full.to(weight.dtype).reshape(pattern.stored_shape)
            else:
                kept = torch.sparse.sampled_addmm(pattern.csr(values), dyt, xt.t(), beta=0.0).values()
                dw = pattern.weight_grad(kept, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dyt.sum(1).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None


def _csr_mm(m: Tensor, dense: Tensor, bias_column: Tensor | None, out: Tensor | None) -> Tensor:
    """``m @ dense`` (+ ``bias_column`` broadcast over the columns), into ``out`` if given."""
    if bias_column is None:
        return torch.mm(m, dense, out=out)
    return torch.addmm(bias_column, m, dense, out=out)


def _result(product, leading: torch.Size, features: int, dtype: torch.dtype, kdt: torch.dtype, features_slowest: bool,
            device: torch.device) -> Tensor:  # fmt: skip
    """The ``(*leading, features)`` result of a CSR product that computes its transpose: ``product(out)`` gives
    the ``(features, rows)`` matrix in ``kdt`` (written into ``out`` if not ``None``). Row-major by default
    (:func:`_row_major`, one reordering copy); ``features_slowest``: stored as that matrix, the leading dims
    row-major inside it, so the product writes straight into it (no copy when ``dtype`` is ``kdt``). Either
    way the result is its own base, not a view."""
    rows = leading.numel()
    if not features_slowest or rows < 2 or features < 2:
        return _row_major(product(None).t(), leading, dtype)
    strides, step = [], 1
    for size in reversed(leading):
        strides.append(step)
        step *= size
    y = torch.empty_strided((*leading, features), (*reversed(strides), rows), dtype=dtype, device=device)
    target = y.view(rows, features).t()  # (features, rows), contiguous
    if dtype == kdt:
        product(target)
    else:
        target.copy_(product(None))
    return y


def _is_features_slowest(x2: Tensor) -> bool:
    """``x2`` (rows, features) is stored as its transpose (and is not a degenerate shape where both layouts agree)."""
    return x2.shape[0] > 1 and x2.shape[1] > 1 and x2.t().is_contiguous()


def csr_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, pattern: SparsePattern, dense_grad: bool = False,
    dtype: torch.dtype | None = None, features_slowest: bool = False,
) -> Tensor:  # fmt: skip
    """``x @ M^T + bias`` with ``M`` the kept entries of ``weight`` (stored layout per ``pattern``).

    ``dtype``: the dtype of the result (default ``x.dtype``; pass the autocast dtype under autocast, which
    the kernels themselves run without). The gradient of ``weight`` is dense with exact zeros at pruned
    positions, or the full dense gradient with ``dense_grad=True``. The result is row-major, as
    ``nn.Linear``'s; ``features_slowest=True`` returns it stored as its transpose instead (no reordering
    copy; for a consumer that is known to take any layout, see :mod:`.chains`). An input stored that way
    is read without a copy, and its gradient comes back in the same layout.
    """
    return _CsrLinear.apply(x, weight, bias, pattern, dense_grad, dtype or x.dtype, features_slowest)


def csr_conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None, pattern: SparsePattern, dense_grad: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """A 1x1 convolution (stride 1, no padding, one group) of ``x`` (``(N, C, H, W)`` or ``(C, H, W)``) as
    :func:`csr_linear` on its channels-last view ``(N, H, W, C)`` (no copy when ``x`` is channels-last).
    The result has ``x``'s memory format, as ``F.conv2d`` gives it."""
    channels = x.dim() - 3
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format
    y = csr_linear(x.movedim(channels, -1), weight, bias, pattern, dense_grad, dtype).movedim(-1, channels)
    return y.contiguous(memory_format=fmt) if y.dim() == 4 else y.contiguous()


# ----------------------------------------------------------------------------- 2:4 (CUDA)
def semi_structured_reason(mask: Tensor, transposed: bool = False) -> str | None:
    """Why a layer with this mask cannot take the 2:4 kernels (``None`` if it can).

    Needs CUDA with compute capability >= 8.0, ``torch.sparse.to_sparse_semi_structured``, and a mask
    keeping at most 2 of every 4 consecutive inputs of each output (the linear weight's rows).
    """
    if mask.dim() != 2:
        return "the 2:4 kernels here take linear layers only"
    if mask.device.type != "cuda":
        return f"2:4 kernels need CUDA (the weight is on {mask.device})"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this torch has no torch.sparse.to_sparse_semi_structured"
    if torch.cuda.get_device_capability(mask.device) < (8, 0):
        return f"2:4 kernels need compute capability >= 8.0, this GPU has {torch.cuda.get_device_capability(mask.device)}"
    linear_mask = mask.t() if transposed else mask
    if not _at_most_2_of_4(linear_mask):
        return "the mask is not 2:4 along the inputs"
    return None


def _at_most_2_of_4(linear_mask: Tensor) -> bool:
    out, n_in = linear_mask.shape
    return n_in % 4 == 0 and bool((linear_mask.reshape(out, n_in // 4, 4).sum(-1) <= 2).all())


def _compress(dense: Tensor) -> Tensor:
    return torch.sparse.to_sparse_semi_structured(dense.contiguous())


class SemiStructuredPattern:
    """A 2:4 mask for :func:`semi_structured_linear`: the linear weight's mask ``M`` (``(out, in)``, on the
    weight's device) and whether ``M^T`` is 2:4 along its rows too (then the input gradient is sparse)."""

    def __init__(self, mask: Tensor, transposed: bool = False):
        reason = semi_structured_reason(mask, transposed)
        if reason is not None:
            raise ValueError(reason)
        self.transposed = transposed
        self.linear_mask = (mask.t() if transposed else mask).contiguous()
        self.out_features, self.in_features = self.linear_mask.shape
        self.transposable = _at_most_2_of_4(self.linear_mask.t())
        self.density = float(self.linear_mask.float().mean())


class _SemiStructuredLinear(torch.autograd.Function):
    @staticmethod
    @_without_autocast
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, pattern: SemiStructuredPattern, dense_grad: bool, dtype: torch.dtype):
        x2 = x.reshape(-1, pattern.in_features).to(dtype)
        m = (weight.t() if pattern.transposed else weight).to(dtype) * pattern.linear_mask  # exact 2:4 even if W drifted
        y = torch.nn.functional.linear(x2, _compress(m), None if bias is None else bias.to(dtype))
        m_for_dx = _compress(m.t()) if pattern.transposable else m
        ctx.save_for_backward(x2, weight)
        ctx.m_for_dx, ctx.pattern, ctx.dense_grad = m_for_dx, pattern, dense_grad
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _not_a_view(y if x.dim() == 2 else y.reshape(*x.shape[:-1], pattern.out_features))

    @staticmethod
    @_without_autocast
    def backward(ctx, dy: Tensor):
        x2, weight = ctx.saved_tensors
        pattern: SemiStructuredPattern = ctx.pattern
        dy2 = dy.reshape(-1, pattern.out_features).to(x2.dtype)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if pattern.transposable:  # dX = dY @ M = F.linear(dY, M^T), M^T held 2:4-compressed
                dx = torch.nn.functional.linear(dy2, ctx.m_for_dx)
            else:
                dx = dy2 @ ctx.m_for_dx
            dx = dx.to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            full = dy2.t() @ x2  # no 2:4 operand here: dense, then masked
            if not ctx.dense_grad:
                full = full * pattern.linear_mask
            dw = (full.t() if pattern.transposed else full).to(weight.dtype).contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None


def semi_structured_linear(x: Tensor, weight: Tensor, bias: Tensor | None, pattern: SemiStructuredPattern, dense_grad: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """``x @ (W * mask)^T + bias`` with a 2:4 mask on the GPU's semi-structured sparse kernels.

    Each call compresses the masked weight (``to_sparse_semi_structured``: cuSPARSELt, else CUTLASS):
    the forward product is sparse; the input gradient is sparse where the mask is also 2:4 along the
    outputs (``pattern.transposable``; the weight's transpose is compressed too), else a dense product
    with the masked weight; the weight gradient has no 2:4 operand (``dY^T @ X``): a dense product,
    multiplied by the mask (exact zeros) unless ``dense_grad``. ``dtype``: the compute and result dtype
    (default ``x.dtype``); fp16/bf16 are the fast ones.
    """
    return _SemiStructuredLinear.apply(x, weight, bias, pattern, dense_grad, dtype or x.dtype)
