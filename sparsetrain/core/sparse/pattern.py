"""The kept positions of one mask, in the layouts the sparse kernels read; built once per mask.

A layer computes ``y = x @ M^T + b`` with ``M`` its *linear weight*, shape ``(out, in)``: the stored
weight for ``nn.Linear``, its transpose for Hugging Face ``Conv1D`` (stored ``(in, out)``), the
``(out, in, 1, 1)`` weight of a 1x1 convolution read as ``(out, in)``. For the
mask of ``M`` a :class:`SparsePattern` holds

* ``crow, col``: the CSR structure of ``M`` (kept positions in row-major order, "CSR order");
* ``crow_t, col_t, perm``: the CSR structure of ``M^T``, and ``perm`` with
  ``values_t = values[perm]`` (CSR order of ``M^T`` from CSR order of ``M``);
* ``flat``: for each kept entry in CSR order, its index in the *stored* weight's flat storage, so
  ``values = weight.view(-1)[flat]`` reads the kept values straight from the dense parameter;
* a dense gradient buffer (stored shape) reused from step to step (:meth:`weight_grad`).

CSR indices and ``perm`` are ``int32`` where they fit (MKL and cuSPARSE run faster on them, and they
take half the memory), else ``int64``; ``flat`` is ``int64`` (``index_copy_`` takes no other). In all,
20 bytes per kept weight with int32 (1 byte per weight at 95 % sparsity), plus the gradient buffer.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

_INT32_MAX = 2**31 - 1
_beta_warning_seen = False


def _silence_csr_beta_warning() -> None:
    """torch warns once per process that CSR tensors are "in beta"; take that one warning here, silently."""
    global _beta_warning_seen
    if not _beta_warning_seen:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.eye(1).to_sparse_csr()
        _beta_warning_seen = True


class SparsePattern:
    """CSR structure of a mask (and of its transpose) plus the gather/scatter indices into the stored weight.

    ``mask``: the bool mask of the stored weight, ``(out, in)`` or a 1x1 convolution's ``(out, in, 1, 1)``;
    ``transposed``: the stored weight is ``M^T`` (``Conv1D``), so ``M``'s mask is ``mask.t()``. Nothing
    here depends on the weight's values.
    """

    def __init__(self, mask: Tensor, transposed: bool = False):
        if mask.dtype != torch.bool or not (mask.dim() == 2 or (mask.dim() == 4 and mask.shape[2:] == (1, 1) and not transposed)):
            raise ValueError(f"a pattern needs a bool mask of a 2-D or 1x1-convolution weight, got {tuple(mask.shape)} {mask.dtype}")
        _silence_csr_beta_warning()
        self.transposed = transposed
        linear_mask = mask.t() if transposed else mask.reshape(mask.shape[0], mask.shape[1])  # (out, in)
        self.out_features, self.in_features = linear_mask.shape
        self.stored_shape = tuple(mask.shape)
        rows, cols = linear_mask.nonzero(as_tuple=True)  # row-major: CSR order of M
        self.nnz = rows.numel()
        index = torch.int32 if max(self.nnz, *linear_mask.shape) <= _INT32_MAX else torch.int64
        self.crow = _crow(rows, self.out_features).to(index)
        self.col = cols.to(index)
        perm = torch.argsort(cols, stable=True)  # by column, rows ascending inside: CSR order of M^T
        self.crow_t = _crow(cols[perm], self.in_features).to(index)
        self.col_t = rows[perm].to(index)
        self.perm = perm.to(index)
        stride_out, stride_in = (1, self.out_features) if transposed else (self.in_features, 1)
        self.flat = rows * stride_out + cols * stride_in
        self._grad_buffer: Tensor | None = None
        self._grad_buffer_version = -1

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.out_features * self.in_features)

    def values(self, weight: Tensor) -> Tensor:
        """The kept entries of the stored dense ``weight``, in CSR order of ``M`` (a gather, O(nnz))."""
        return weight.reshape(-1).index_select(0, self.flat)

    def csr(self, values: Tensor) -> Tensor:
        """``M`` as a CSR tensor holding ``values`` (CSR order); no copy, no invariant check."""
        return torch.sparse_csr_tensor(
            self.crow, self.col, values, (self.out_features, self.in_features), check_invariants=False
        )

    def csr_t(self, values: Tensor) -> Tensor:
        """``M^T`` as a CSR tensor, from ``values`` in CSR order of ``M``."""
        return torch.sparse_csr_tensor(
            self.crow_t, self.col_t, values.index_select(0, self.perm), (self.in_features, self.out_features),
            check_invariants=False,
        )  # fmt: skip

    def weight_grad(self, values: Tensor, weight: Tensor) -> Tensor:
        """The dense gradient of the stored ``weight``: ``values`` (CSR order) at kept positions, exact zeros elsewhere.

        The result is a fresh view of a buffer kept from step to step: autograd takes it as
        ``weight.grad`` without a copy (a view no one else references), and the buffer is reused
        instead of allocating a new dense tensor per step, whose pages the allocator maps afresh
        each time (about 10x slower on the CPU). Only the kept positions are written: the pruned ones
        are still zero from the last step unless something wrote the buffer in place since (its
        version counter moved: clipping's multiply, an all-reduce, ``zero_grad(set_to_none=False)``),
        and then it is zeroed first (a write through ``.data`` moves no counter and is not seen). The
        buffer is not reused while any tensor still uses it (``weight.grad`` under gradient accumulation
        or ``zero_grad(set_to_none=False)``, the first of two gradients of a layer called twice in one
        forward, a gradient the caller kept): then the gradient is a new tensor.
        """
        buffer = self._grad_buffer
        if buffer is None or buffer.dtype != weight.dtype or buffer.device != weight.device:
            buffer = self._grad_buffer = torch.zeros(self.stored_shape, dtype=weight.dtype, device=weight.device)
        elif _in_use(buffer):
            buffer = torch.zeros(self.stored_shape, dtype=weight.dtype, device=weight.device)
        elif buffer._version != self._grad_buffer_version:
            buffer.zero_()
        buffer.view(-1).index_copy_(0, self.flat, values.to(weight.dtype))
        if buffer is self._grad_buffer:
            self._grad_buffer_version = buffer._version  # zero at pruned positions while it stays at this version
        return buffer.view(self.stored_shape)

    def release(self) -> None:
        """Drop the gradient buffer (it is rebuilt on the next backward)."""
        self._grad_buffer = None
        self._grad_buffer_version = -1

    def __getstate__(self) -> dict:  # the buffer is scratch space, not state
        return {**self.__dict__, "_grad_buffer": None, "_grad_buffer_version": -1}


def _in_use(buffer: Tensor) -> bool:
    """Whether another tensor (a view handed out earlier) still uses ``buffer``'s memory. Counts the references to
    its storage (``buffer`` and the temporary storage object make 2); a torch without that count: always in use."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count is None or use_count(buffer.untyped_storage()._cdata) > 2


def _crow(rows: Tensor, n_rows: int) -> Tensor:
    """CSR row pointers from sorted row indices."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])
