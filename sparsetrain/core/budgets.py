"""Layer-wise budgets: how many weights each target keeps for a given global sparsity.

``uniform``: every layer keeps the same fraction. ``erk`` (Evci et al. 2020): layer ``l``
with shape ``(n_out, n_in, *kernel)`` gets the raw score ``r_l = (sum(shape) / prod(shape)) ** power``
and density ``eps * r_l``, with ``eps`` solved so that ``sum_l eps * r_l * N_l`` is the kept
budget; a layer whose density would exceed 1 is made dense, taken out of the budget, and
``eps`` solved again. ``er`` is the same with only ``n_out`` and ``n_in``. ``global`` has no
fixed budget per layer: one magnitude threshold over all targets decides (see
:func:`sparsetrain.core.masks.topk_masks`).

``overrides`` maps globs on target names to a fixed per-layer *sparsity*, e.g.
``{"*.fc.weight": 0.5}``; the other layers share what is left of the budget.

Counts are exact integers: the total kept count is ``round((1 - s) * sum N_l)`` and each
layer is within one weight of its real-valued share (largest-remainder rounding).

``structure="N:M"`` (see :mod:`sparsetrain.core.nm`): every layer whose inputs per output (in the
target's layout, :mod:`sparsetrain.core.layouts`; ``nm_layout`` picks a convolution's) are a multiple
of ``M`` keeps exactly ``N`` of every ``M`` weights at the final sparsity ``1 - N/M`` (and at
least ``N`` per group below it, for gradual pruning). Layers that cannot hold the structure
(``indivisible``) stay ``dense``, are pruned ``unstructured`` at the same sparsity, or make the
check fail (``error``); layers named in ``overrides`` leave the structure and keep their own
sparsity. The distribution is ``uniform`` (N:M fixes every layer's count).
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from torch import Tensor

from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.layouts import NM_LAYOUTS, Layout, check_pieces, groupings
from sparsetrain.core.masks import Masks, global_topk_masks, topk_masks
from sparsetrain.core.nm import NMStructure
from sparsetrain.core.shards import Shards, full_shapes
from sparsetrain.core.starved import starved_layers, starved_message
from sparsetrain.core.validation import check_choice, check_globs, check_number, check_sparsity

DISTRIBUTIONS = ("uniform", "erk", "er", "global")
LAYER_DISTRIBUTIONS = ("uniform", "erk", "er")  # a fixed count per layer (what RigL, SET and Static need)
OVERRIDES_MODES = ("exact", "outside")  # the rest share what is left (global sparsity exact) | overrides leave the budget
INDIVISIBLE = ("dense", "unstructured", "error")  # N:M: layers whose input size is not a multiple of M
GLOBAL = "*"  # the pool of the targets that distribution="global" ranks together (see Budget.pool_counts)


def check_distribution(distribution: str, allowed: tuple[str, ...] = DISTRIBUTIONS) -> str:
    return check_choice(distribution, "distribution", allowed)


def resolve_overrides(names: list[str], overrides: Mapping[str, float] | None) -> dict[str, float]:
    """Map each target name to its overridden sparsity; the first matching glob wins."""
    resolved: dict[str, float] = {}
    for glob, sparsity in check_globs(overrides, "overrides").items():
        matched = [n for n in names if fnmatch.fnmatchcase(n, glob)]
        if not matched:
            raise SparsityConfigError(
                f"overrides key {glob!r} matches no target; targets are: {', '.join(names[:8])}"
                + (", ..." if len(names) > 8 else "")
            )
        for n in matched:
            resolved.setdefault(n, float(sparsity))
    return resolved


def raw_scores(shapes: Mapping[str, tuple[int, ...]], distribution: str, power: float = 1.0) -> dict[str, float]:
    """Unnormalised density score per layer (1 for ``uniform``)."""
    scores = {}
    for name, shape in shapes.items():
        dims = shape[:2] if distribution == "er" else shape
        if distribution == "uniform" or len(shape) < 2:
            scores[name] = 1.0
        else:
            scores[name] = (sum(dims) / math.prod(dims)) ** power
    return scores


def layer_densities(
    shapes: Mapping[str, tuple[int, ...]],
    sparsity: float,
    distribution: str = "erk",
    power: float = 1.0,
    overrides: Mapping[str, float] | None = None,
    overrides_mode: str = "exact",
) -> dict[str, float]:
    """Real-valued density per layer such that ``sum density_l * N_l == (1 - sparsity) * sum N_l``.

    ``overrides_mode="outside"`` (rigl's ``custom_sparsity_map``, and its ``first_layer_sparsity``)
    takes the overridden layers out of the budget instead: the others are solved at ``sparsity``
    over their own weights, so the global sparsity is no longer exactly ``sparsity``.
    """
    check_sparsity(sparsity)
    check_distribution(distribution, ("uniform", "erk", "er"))
    check_choice(overrides_mode, "overrides_mode", OVERRIDES_MODES)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    fixed = {n: 1.0 - s for n, s in resolve_overrides(list(shapes), overrides).items()}
    if overrides_mode == "outside":
        budget = (1.0 - sparsity) * sum(sizes[n] for n in shapes if n not in fixed)
    else:
        budget = (1.0 - sparsity) * sum(sizes.values()) - sum(fixed[n] * sizes[n] for n in fixed)
    free = [n for n in shapes if n not in fixed]
    if budget < -1e-9 or (not free and abs(budget) > 0.5):
        raise SparsityConfigError(
            f"overrides={dict(overrides or {})} keep {sum(fixed[n] * sizes[n] for n in fixed):.0f} weights, "
            f"which does not fit a global sparsity={sparsity} ({(1 - sparsity) * sum(sizes.values()):.0f} weights kept)"
        )
    scores = raw_scores({n: shapes[n] for n in free}, distribution, power)
    dense: set[str] = set()
    while True:
        rest = [n for n in free if n not in dense]
        remaining = budget - sum(sizes[n] for n in dense)
        weighted = sum(scores[n] * sizes[n] for n in rest)
        eps = remaining / weighted if weighted > 0 else 0.0
        too_dense = [n for n in rest if eps * scores[n] > 1.0]
        if not too_dense:
            break
        dense.update(too_dense)
    if remaining < -1e-6 or (not rest and remaining > 0.5):
        raise SparsityConfigError(
            f"overrides={dict(overrides or {})} leave a budget for the other layers that they cannot hold "
            f"at sparsity={sparsity}"
        )
    densities = {n: fixed.get(n, 1.0 if n in dense else eps * scores.get(n, 0.0)) for n in shapes}
    return densities


def counts_from_densities(shapes: Mapping[str, tuple[int, ...]], densities: Mapping[str, float]) -> dict[str, int]:
    """Integer kept counts: total is the rounded real total, each layer within one of its share."""
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    shares = {n: min(densities[n], 1.0) * sizes[n] for n in shapes}
    counts = {n: math.floor(shares[n] + 1e-9) for n in shapes}
    missing = round(sum(shares.values())) - sum(counts.values())
    by_remainder = sorted(shapes, key=lambda n: shares[n] - counts[n], reverse=True)
    for n in by_remainder:
        if missing <= 0:
            break
        if counts[n] < sizes[n]:
            counts[n] += 1
            missing -= 1
    return counts


def layer_counts(
    shapes: Mapping[str, tuple[int, ...]],
    sparsity: float,
    distribution: str = "erk",
    power: float = 1.0,
    overrides: Mapping[str, float] | None = None,
    overrides_mode: str = "exact",
) -> dict[str, int]:
    """Number of weights each layer keeps (``uniform``, ``erk`` or ``er``)."""
    densities = layer_densities(shapes, sparsity, distribution, power, overrides, overrides_mode)
    return counts_from_densities(shapes, densities)


def global_counts(
    shapes: Mapping[str, tuple[int, ...]],
    sparsity: float,
    overrides: Mapping[str, float] | None = None,
    overrides_mode: str = "exact",
) -> tuple[dict[str, int], int]:
    """``distribution="global"``: the kept count of every overridden layer, and the count the others share."""
    check_sparsity(sparsity)
    fixed = resolve_overrides(list(shapes), overrides)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    fixed_counts = {n: round((1.0 - fixed[n]) * sizes[n]) for n in fixed}
    rest = sum(sizes[n] for n in shapes if n not in fixed)
    if overrides_mode == "outside":
        keep = round((1.0 - sparsity) * rest)
    else:
        keep = round((1.0 - sparsity) * sum(sizes.values())) - sum(fixed_counts.values())
    if keep < 0 or keep > rest:
        raise SparsityConfigError(
            f"overrides={dict(overrides or {})} do not fit a global sparsity={sparsity}: "
            f"{keep} weights would be left for the other layers, which hold {rest}"
        )
    return fixed_counts, keep


def monotone_counts(counts: Mapping[str, int], held: Mapping[str, int], final: Mapping[str, int]) -> dict[str, int]:
    """Kept counts for a pruning step that only prunes: ``counts`` where they lie in ``[final, held]``.

    A count above what its pool holds (``held``: pruned weights never come back) is lowered to it, one
    below its count at the end of the schedule (``final``) is raised to that; then the total is brought
    back to ``sum(counts)`` by moving the difference onto the pools with the most room inside their bounds
    (``held - count`` to give, ``count - final`` to take; ties in name order), as far as the bounds allow.
    So counts never increase from step to step, and a step whose ``counts`` are ``final`` ends exactly on
    them (largest-remainder rounding alone can give a layer one weight less just before the end).

    Example::

        >>> monotone_counts({"a": 14, "b": 1639}, held={"a": 15, "b": 1700}, final={"a": 15, "b": 1638})
        {'a': 15, 'b': 1638}
    """
    out = {n: min(max(c, final[n]), held[n]) for n, c in counts.items()}
    excess = sum(out.values()) - sum(counts.values())
    room = {n: out[n] - final[n] if excess > 0 else held[n] - out[n] for n in out}
    for n in sorted(out, key=lambda n: -room[n]):  # stable: ties keep the name order of ``counts``
        if excess == 0:
            break
        move = min(max(room[n], 0), abs(excess))
        out[n] += -move if excess > 0 else move
        excess += move if excess < 0 else -move
    return out


@dataclass(frozen=True)
class Budget:
    """How a global sparsity is shared among the targets: the one budget object of every method.

    ``distribution``: ``uniform``, ``erk``, ``er`` (a count per layer, see :func:`layer_counts`) or
    ``global`` (one magnitude threshold over all targets, where the method allows it); ``power``:
    the ERK exponent (1 = ERK, 0 = uniform); ``overrides``: globs on target names mapped to a fixed
    per-layer sparsity; ``overrides_mode``: ``exact`` (the other layers share what is left, so the
    global sparsity is exact) or ``outside`` (rigl's convention: overridden layers leave the
    budget, the others are solved at ``sparsity`` among themselves). ``structure``: ``None``
    (unstructured) or ``"N:M"``, with ``indivisible`` (``dense``, ``unstructured`` or ``error``) for
    the layers that cannot hold it (module docstring) and ``nm_layout`` (``channels`` or ``flat``: how a
    convolution's groups run, :mod:`sparsetrain.core.layouts`). Methods that take target layouts
    (``layouts``: ``{name: Layout}``, :func:`~sparsetrain.core.layouts.target_layouts`) read each target's
    groups along its real input dim; without them, every target is read as ``weight.reshape(rows, -1)``.
    Values are checked at construction;
    :meth:`check` runs the arithmetic on the real target shapes at fit start, so a budget that
    cannot be met fails before training.

    Example::

        >>> Budget("erk", overrides={"fc.*": 0.5}).counts({"conv.weight": (16, 3, 3, 3), "fc.weight": (10, 64)}, 0.8)
        {'conv.weight': 34, 'fc.weight': 320}
    """

    distribution: str = "erk"
    power: float = 1.0
    overrides: dict[str, float] = field(default_factory=dict)
    overrides_mode: str = "exact"
    structure: str | None = None
    indivisible: str = "dense"
    nm_layout: str = "channels"
    allowed: tuple[str, ...] = field(default=DISTRIBUTIONS, compare=False, repr=False)

    def __post_init__(self):
        check_distribution(self.distribution, self.allowed)
        check_choice(self.overrides_mode, "overrides_mode", OVERRIDES_MODES)
        check_choice(self.indivisible, "indivisible", INDIVISIBLE)
        check_choice(self.nm_layout, "nm_layout", NM_LAYOUTS)
        object.__setattr__(self, "power", check_number(self.power, "power", meaning="ERK exponent: 1 = ERK, 0 = uniform"))
        object.__setattr__(self, "overrides", check_globs(self.overrides, "overrides"))
        nm = NMStructure.parse(self.structure)
        object.__setattr__(self, "structure", None if nm is None else str(nm))
        if nm is not None and self.distribution != "uniform":
            raise SparsityConfigError(
                f"distribution={self.distribution!r} cannot be combined with structure={self.structure!r}: an N:M layer "
                f"keeps exactly {nm.n} of every {nm.m} weights, so every such layer is {nm.sparsity:.0%} sparse; "
                "use distribution='uniform' (overrides still give single layers their own sparsity)"
            )

    @property
    def nm(self) -> NMStructure | None:
        return NMStructure.parse(self.structure)

    def args(self) -> dict:
        """The budget as the arguments a method takes (``distribution``, ``power``, ``overrides``, ``overrides_mode``,
        ``structure``, ``indivisible``, and ``nm_layout`` where a structure makes it matter): one set of fields for
        every method with a layer budget, saved in checkpoints as the method's configuration."""
        args = dict(
            distribution=self.distribution, power=self.power, overrides=dict(self.overrides),
            overrides_mode=self.overrides_mode, structure=self.structure, indivisible=self.indivisible,
        )  # fmt: skip
        return {**args, "nm_layout": self.nm_layout} if self.structure is not None else args

    def with_overrides(self, overrides: Mapping[str, float]) -> Budget:
        return replace(self, overrides=dict(overrides))

    def check_final(self, sparsity: float, key: str = "sparsity") -> float:
        """With a structure, the final sparsity must be the structure's ``1 - N/M``."""
        nm = self.nm
        if nm is not None and abs(sparsity - nm.sparsity) > 1e-9:
            raise SparsityConfigError(
                f"{key}={sparsity} does not match structure={self.structure!r}, which keeps {nm.n} of every {nm.m} "
                f"weights: set {key}={nm.sparsity:g}"
            )
        return sparsity

    def structured(
        self, shapes: Mapping[str, tuple[int, ...]], layouts: Mapping[str, Layout] | None = None, shards=None
    ) -> dict[str, NMStructure]:
        """The targets that hold the structure, each with the structure bound to its reading (``nm.on(grouping)``).

        ``shards``: the targets are sharded by dim 0; a shard that would split a group fails here
        (:func:`~sparsetrain.core.layouts.check_pieces`).
        """
        nm = self.nm
        if nm is None:
            return {}
        overridden = set(resolve_overrides(list(shapes), self.overrides)) if self.overrides else set()
        found = {n: g for n, g in groupings(shapes, layouts, self.nm_layout).items() if n not in overridden and g.fits(nm.m)}
        if shards is not None:
            check_pieces(found, shards.pieces, shapes, nm.m)
        return {n: nm.on(g) for n, g in found.items()}

    def split(
        self, shapes: Mapping[str, tuple[int, ...]], layouts: Mapping[str, Layout] | None = None
    ) -> tuple[list[str], list[str], list[str]]:
        """``(structured, indivisible, overridden)`` target names; all unstructured without a structure."""
        overridden = list(resolve_overrides(list(shapes), self.overrides)) if self.overrides else []
        if self.nm is None:
            return [], [], overridden
        structured = self.structured(shapes, layouts)
        return list(structured), [n for n in shapes if n not in structured and n not in overridden], overridden

    def _unstructured(self, shapes: Mapping[str, tuple[int, ...]], layouts=None) -> dict[str, tuple[int, ...]]:
        """The targets a structured budget prunes without structure: overridden, and indivisible ones if so chosen."""
        _, indivisible, overridden = self.split(shapes, layouts)
        names = set(overridden) | (set(indivisible) if self.indivisible == "unstructured" else set())
        return {n: s for n, s in shapes.items() if n in names}

    def counts(self, shapes: Mapping[str, tuple[int, ...]], sparsity: float, layouts: Mapping[str, Layout] | None = None) -> dict[str, int]:
        """Kept weights per layer (``uniform``, ``erk``, ``er``)."""
        if self.nm is None:
            return layer_counts(shapes, sparsity, self.distribution, self.power, self.overrides, self.overrides_mode)
        counts = {n: math.prod(s) for n, s in shapes.items()}  # structured: (1 - s) of each; indivisible dense: all
        structured, _, _ = self.split(shapes, layouts)
        counts.update({n: round((1.0 - sparsity) * counts[n]) for n in structured})
        loose = self._unstructured(shapes, layouts)
        if loose:
            counts.update(layer_counts(loose, sparsity, "uniform", 1.0, self.overrides, "outside"))
        return counts

    def pool_counts(self, shapes: Mapping[str, tuple[int, ...]], sparsity: float, layouts: Mapping[str, Layout] | None = None) -> dict[str, int]:
        """Kept weights per pool: per layer (:meth:`counts`), or for ``global`` each overridden layer's and
        the shared count of the others under the key :data:`GLOBAL`."""
        if self.distribution != "global":
            return self.counts(shapes, sparsity, layouts)
        fixed, keep = global_counts(shapes, sparsity, self.overrides, self.overrides_mode)
        return {**fixed, GLOBAL: keep}

    def pooled(self, values: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        """Per-target ``values`` (e.g. active weights) summed into the pools of :meth:`pool_counts`."""
        if self.distribution != "global":
            return dict(values)
        fixed = resolve_overrides(list(shapes), self.overrides)
        out = {n: values[n] for n in fixed}
        out[GLOBAL] = sum(v for n, v in values.items() if n not in fixed)
        return out

    def kept(self, shapes: Mapping[str, tuple[int, ...]], sparsity: float, layouts: Mapping[str, Layout] | None = None) -> int:
        """How many weights all targets keep in total at ``sparsity``."""
        return sum(self.pool_counts(shapes, sparsity, layouts).values())

    def check(self, shapes: Mapping[str, tuple[int, ...]], *sparsities: float, layouts: Mapping[str, Layout] | None = None) -> None:
        """Raise now if any of ``sparsities`` cannot be met on targets of these shapes.

        With a structure, warn once about the layers that cannot hold it (or raise for ``indivisible="error"``).
        Warn about layers whose count leaves units without any weight (:mod:`sparsetrain.core.starved`).
        """
        nm = self.nm
        if nm is not None:
            _, indivisible, _ = self.split(shapes, layouts)
            if indivisible:
                read = groupings({n: shapes[n] for n in indivisible}, layouts, self.nm_layout)
                listed = ", ".join(f"{n} {tuple(shapes[n])} [{read[n].name}, runs of {read[n].run}]" for n in indivisible[:6])
                listed += ", ..." if len(indivisible) > 6 else ""
                if self.indivisible == "error":
                    raise SparsityConfigError(
                        f"structure={self.structure!r}: {len(indivisible)} targets have an input size (inputs per output, "
                        f"in nm_layout={self.nm_layout!r} for convolutions) that is not a multiple of {nm.m}: {listed}. "
                        "Allowed: indivisible='dense' (keep them dense), 'unstructured' (prune them without structure), "
                        "or exclude them from the targets"
                    )
                warnings.warn(
                    f"structure={self.structure!r}: {len(indivisible)} targets cannot hold it (input size not a multiple of "
                    f"{nm.m}) and are {'kept dense' if self.indivisible == 'dense' else 'pruned unstructured'} "
                    f"(indivisible={self.indivisible!r}): {listed}",
                    stacklevel=2,
                )
        for sparsity in sparsities:
            counts = self.pool_counts(shapes, sparsity, layouts)
            starved = {} if self.distribution == "global" else starved_layers(counts, shapes)
            if starved:
                warnings.warn(starved_message(starved, f"distribution={self.distribution!r} at sparsity {sparsity:g}:"), stacklevel=2)

    def masks(self, scores, sparsity: float, shards=None, layouts: Mapping[str, Layout] | None = None, counts=None):
        """Keep the highest ``scores`` under this budget (see :func:`budget_masks`).

        Structured layers keep the ``N`` highest of every group at ``sparsity = 1 - N/M``; below it,
        their top ``round((1 - sparsity) * numel)`` with the ``N`` highest of every group first.
        ``layouts``: each target's layout (groups along its real input dim). ``counts``: the kept count of
        every pool (:meth:`pool_counts`, the default; GMP passes its monotone counts). ``shards``
        (:class:`~sparsetrain.core.shards.Shards`): ``scores`` are this rank's pieces of sharded targets;
        counts and selections are over the whole tensors (N:M groups never cross a shard:
        :meth:`structured` checks it).
        """
        shapes = full_shapes(scores, shards)
        counts = self.pool_counts(shapes, sparsity, layouts) if counts is None else counts
        structured = self.structured(shapes, layouts, shards)
        nm = self.nm
        final = nm is not None and sparsity >= nm.sparsity - 1e-9
        out = {n: s.mask(scores[n]) for n, s in structured.items()} if final else {}
        out.update(topk_masks({n: s.protect(scores[n]) for n, s in structured.items() if n not in out}, counts, shards))
        if self.distribution == "global":
            pooled = {n: v for n, v in scores.items() if n not in counts}
            out.update(topk_masks({n: v for n, v in scores.items() if n in counts}, counts, shards))
            if pooled:
                out.update(global_topk_masks(pooled, counts[GLOBAL], shards))
        else:
            out.update(topk_masks({n: v for n, v in scores.items() if n not in out}, counts, shards))
        return {n: out[n] for n in scores}


def budget_masks(
    scores: Mapping[str, Tensor],
    sparsity: float,
    distribution: str = "uniform",
    power: float = 1.0,
    overrides: Mapping[str, float] | None = None,
    overrides_mode: str = "exact",
    shards: Shards | None = None,
) -> Masks:
    """Keep the highest scores under a layer-wise budget (see :mod:`sparsetrain.core.budgets`).

    ``global`` keeps the ``round((1 - sparsity) * N)`` highest scores over all targets that have
    no override; overridden layers keep their own top-k.
    """
    shapes = full_shapes(scores, shards)
    if distribution != "global":
        return topk_masks(scores, layer_counts(shapes, sparsity, distribution, power, overrides, overrides_mode), shards)
    fixed_counts, keep = global_counts(shapes, sparsity, overrides, overrides_mode)
    rest = [n for n in scores if n not in fixed_counts]
    masks = topk_masks({n: scores[n] for n in fixed_counts}, fixed_counts, shards)
    if rest:
        masks.update(global_topk_masks({n: scores[n] for n in rest}, keep, shards))
    return {n: masks[n] for n in scores}
