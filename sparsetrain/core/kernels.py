"""The hot path: ``t *= mask`` in place over all targets, eager or compiled.

``eager`` is one ``torch._foreach_mul_`` call (multi-tensor kernels on CUDA, a loop of
vectorised kernels on CPU) with the bool masks viewed as ``uint8``: the same bytes, but on
CPU a float-by-uint8 multiply runs about 3x faster than float-by-bool. On CPU that multiply
first converts the mask to a float temporary as large as the tensor; for a large tensor
glibc maps that temporary fresh from the kernel on every call, and the page faults made the
multiply 3-8x slower than the memory traffic it needs (24 ms against 3 ms for 10 M weights).
So on CPU the eager kernel cuts contiguous tensors into chunks of ``CPU_CHUNK`` elements:
each temporary is 2 MiB, is reused, and stays in cache (0.3 ns per weight, two threads).
``compiled`` is the same loop traced by ``torch.compile`` (Triton on CUDA, inductor's C++
backend on CPU). ``auto`` picks ``compiled`` on CUDA and ``eager`` on CPU, where inductor's
kernel measured slower (7.4 ms for 10 M weights). If compilation is unavailable or fails,
the kernel warns once and falls back to eager for good. Both give bit-identical results:
multiplying by 0 or 1 is exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from sparsetrain.core.errors import SparsityConfigError

KERNELS = ("auto", "eager", "compiled")
CPU_CHUNK = 1 << 19  # elements per piece of the eager CPU multiply (see the module docstring)


def _mul_masks(tensors: list[Tensor], masks: list[Tensor]) -> None:
    for t, m in zip(tensors, masks):
        t.mul_(m)


def cpu_chunks(tensors: list[Tensor], masks: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The same pairs with every contiguous tensor above ``CPU_CHUNK`` elements cut into flat views of at most that."""
    chunked_tensors, chunked_masks = [], []
    for t, m in zip(tensors, masks):
        if t.numel() > CPU_CHUNK and t.is_contiguous() and m.is_contiguous():
            chunked_tensors += t.view(-1).split(CPU_CHUNK)
            chunked_masks += m.view(-1).split(CPU_CHUNK)
        else:
            chunked_tensors.append(t)
            chunked_masks.append(m)
    return chunked_tensors, chunked_masks


def _eager_mask_mul(tensors: list[Tensor], masks: list[Tensor]) -> None:
    if tensors[0].device.type == "cpu":
        tensors, masks = cpu_chunks(tensors, masks)
    torch._foreach_mul_(tensors, masks)


class CompiledKernel:
    """Runs ``eager_fn`` or ``torch.compile(traced_fn)`` by ``kind`` (``auto``, ``eager``, ``compiled``).

    ``auto`` compiles on CUDA only. The first failure to compile or run the compiled function
    warns once and switches to ``eager_fn`` for good. Subclasses set the two functions.
    """

    eager_fn = staticmethod(_mul_masks)
    traced_fn = staticmethod(_mul_masks)
    name = "kernel"

    def __init__(self, kind: str = "auto"):
        if kind not in KERNELS:
            raise SparsityConfigError(f"kernel={kind!r} is unknown; allowed: {', '.join(KERNELS)}")
        self.kind = kind
        self._compiled = None
        self._fell_back = False

    def uses_compile(self, device: torch.device) -> bool:
        if self._fell_back:
            return False
        return self.kind == "compiled" or (self.kind == "auto" and device.type == "cuda")

    def run(self, device: torch.device, *args):
        if self.uses_compile(device):
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self.traced_fn, fullgraph=True, dynamic=False)
                return self._compiled(*args)
            except Exception as err:  # no compiler, unsupported backend, ...: eager from now on
                self._fell_back = True
                warnings.warn(
                    f"torch.compile of the {self.name} failed ({type(err).__name__}: {str(err)[:200]}); "
                    f"using the eager {self.name} instead",
                    stacklevel=3,
                )
        return self.eager_fn(*args)

    def __getstate__(self) -> dict:  # compiled functions do not pickle or deepcopy; rebuild lazily
        return {**self.__dict__, "_compiled": None}


class MaskKernel(CompiledKernel):
    """Applies masks in place: ``t *= mask`` for every pair; ``kind`` is ``auto``, ``eager`` or ``compiled``."""

    eager_fn = staticmethod(_eager_mask_mul)
    name = "foreach mask kernel"

    @torch.no_grad()
    def __call__(self, tensors: Iterable[Tensor | None], masks: Iterable[Tensor]) -> None:
        pairs = [(t, m) for t, m in zip(tensors, masks) if t is not None]
        if pairs:
            ts = [t for t, _ in pairs]
            ms = [m.view(torch.uint8) if m.dtype == torch.bool else m for _, m in pairs]
            self.run(ts[0].device, ts, ms)
