"""Sparse compute for masked layers: forward and backward on sparse kernels, the dense parameter untouched.

* :class:`SparseCompute` (:mod:`.compute`): what an engine attaches to a model for ``compute="sparse"``
  or ``"auto"``;
* :func:`csr_linear`, :func:`semi_structured_linear` (:mod:`.linear`): the autograd functions;
* :class:`SparsePattern` (:mod:`.pattern`): a mask's CSR structures, built once per mask.

Plain torch, no Lightning. See ``docs/sparse_compute.md``.
"""

from sparsetrain.core.sparse.compute import (
    COMPUTE_MODES,
    SPARSE_KERNELS,
    SparseCompute,
    refusals,
)
from sparsetrain.core.sparse.linear import (
    SemiStructuredPattern,
    csr_linear,
    kernel_dtype,
    semi_structured_linear,
)
from sparsetrain.core.sparse.pattern import SparsePattern

__all__ = [
    "COMPUTE_MODES",
    "SPARSE_KERNELS",
    "SemiStructuredPattern",
    "SparseCompute",
    "SparsePattern",
    "csr_linear",
    "kernel_dtype",
    "refusals",
    "semi_structured_linear",
]
