"""N:M structured sparsity: every group of ``M`` consecutive weights along the input dim keeps ``N``.

Layout. An unbound structure reads a weight of shape ``(out, in, *kernel)`` as the matrix
``weight.reshape(out, -1)`` and cuts every row into groups of ``M`` consecutive entries (right for
``nn.Linear``: the layout ``torch.sparse.to_sparse_semi_structured`` expects for 2:4). Where a layer's
inputs lie elsewhere (Hugging Face ``Conv1D`` stores ``(in, out)``; hardware 2:4 for a convolution groups
input channels at each kernel position), bind the target's reading: ``nm.on(grouping)`` with a
:class:`~sparsetrain.core.layouts.Grouping` (see :mod:`sparsetrain.core.layouts`); every operation below
then runs on those groups and returns tensors of the weight's shape.

Three operations, all per group and exact:

* :meth:`NMStructure.mask`: keep the ``N`` highest scores of every group (static N:M, the final
  mask of GMP/IMP, RigL's initial mask);
* :meth:`NMStructure.protect`: give the ``N`` highest scores of every group ``+inf``, so that an
  unstructured top-``k`` with ``k >= N/M * numel`` keeps them first (gradual pruning that ends
  N:M: each group keeps at least ``N`` along the way and exactly ``N`` at ``1 - N/M``);
* :func:`refill_groups` (in :mod:`sparsetrain.core.regrowth`): grow back, in each group, as many
  positions as the drop took out of it (RigL/SET: every group keeps its count).

Ties go to the lower position in the group for ``M <= 8`` (the same on every device), to ``torch.topk``'s
order above.

Example::

    >>> s = NMStructure.parse("2:4")
    >>> s.mask(torch.tensor([[0.1, 0.9, 0.5, 0.2, 3.0, 1.0, 2.0, 0.0]]))
    tensor([[False,  True,  True, False,  True, False,  True, False]])
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.layouts import Grouping

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMStructure:
    """``N`` kept of every ``M`` consecutive weights along the input dim (``1 <= N < M``), read by
    ``grouping`` (``None``: the rows of ``weight.reshape(out, -1)``)."""

    n: int
    m: int
    grouping: Grouping | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, structure: str | None, key: str = "structure") -> NMStructure | None:
        """``"2:4"`` -> ``NMStructure(2, 4)``; ``None`` or ``"unstructured"`` -> ``None``."""
        if structure is None or structure == "unstructured":
            return None
        found = _PATTERN.match(structure) if isinstance(structure, str) else None
        n, m = (int(found[1]), int(found[2])) if found else (0, 0)
        if not found or not 1 <= n < m:
            raise SparsityConfigError(
                f"{key}={structure!r} must be 'N:M' with 1 <= N < M (e.g. '2:4', '1:4', '4:8'), "
                "or None / 'unstructured'"
            )
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        """``1 - N/M``: the sparsity of every layer that holds this structure."""
        return 1.0 - self.n / self.m

    def on(self, grouping: Grouping | None) -> NMStructure:
        """This structure read by ``grouping`` (one target's: :meth:`Layout.grouping <sparsetrain.core.layouts.Layout.grouping>`)."""
        return replace(self, grouping=grouping)

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether a weight of ``shape`` (2 or more dims) can hold the structure: its row length (unbound) or
        the grouping's run is a multiple of ``M``."""
        if self.grouping is not None:
            return self.grouping.fits(self.m)
        return len(shape) >= 2 and math.prod(shape[1:]) % self.m == 0

    def groups(self, t: Tensor) -> Tensor:
        """``t`` as ``(number of groups, M)``."""
        if self.grouping is not None:
            return self.grouping.groups(t, self.m)
        if not self.fits(tuple(t.shape)):
            raise ValueError(f"shape {tuple(t.shape)} does not fit {self}: its row length is not a multiple of {self.m}")
        return t.reshape(-1, self.m)

    def ungroup(self, g: Tensor, shape: tuple[int, ...]) -> Tensor:
        """The inverse of :meth:`groups`: ``g`` as a tensor of ``shape``."""
        return g.reshape(shape) if self.grouping is None else self.grouping.ungroup(g, tuple(shape))

    def mask(self, scores: Tensor, n: int | None = None) -> Tensor:
        """Keep the ``n`` (default ``N``) highest ``scores`` of every group (no NaN in ``scores``).

        For ``M <= 8`` ties go to the lower position in the group, by pairwise comparisons (each
        weight's rank in its group, ``M (M - 1) / 2`` compares per group: 3x faster than a
        ``topk`` along groups of 4 on the CPU, ``experiments/results/bench_nm_update.md``).
        """
        n = self.n if n is None else n
        g = self.groups(scores)
        if self.m > 8:
            keep = torch.zeros(g.shape, dtype=torch.bool, device=scores.device)
            if n > 0:  # ties: torch.topk's order (deterministic for equal inputs on one device)
                keep.scatter_(1, g.topk(n, dim=1, sorted=False).indices, True)
            return self.ungroup(keep, scores.shape)
        columns = g.t().contiguous()  # (M, groups): each position of a group is one contiguous row
        beaten = torch.zeros(columns.shape, dtype=torch.uint8, device=scores.device)  # how many rank above
        for i in range(self.m):
            for j in range(i + 1, self.m):
                wins = (columns[i] >= columns[j]).view(torch.uint8)  # a tie goes to i, the lower position
                beaten[j] += wins
                beaten[i] += 1 - wins
        return self.ungroup((beaten < n).t(), scores.shape)

    def protect(self, scores: Tensor) -> Tensor:
        """``scores`` (float) with the ``N`` highest of every group raised to ``+inf``."""
        return scores.float().masked_fill(self.mask(scores), float("inf"))

    def group_counts(self, mask: Tensor) -> Tensor:
        """Kept positions per group (int64, one per group)."""
        return self.groups(mask).sum(1)

    def holds(self, mask: Tensor) -> bool:
        """Whether every group of ``mask`` keeps exactly ``N``."""
        return bool((self.group_counts(mask) == self.n).all())
