"""Which parameters are prunable.

Default targets: the ``weight`` of every convolution (``Conv1d/2d/3d``), transposed
convolution (``ConvTranspose1d/2d/3d``) and linear layer (``nn.Linear`` and its subclasses,
which covers timm's and torchvision's layers and ``MultiheadAttention.out_proj``), and of
Hugging Face's ``Conv1D`` (``transformers.pytorch_utils.Conv1D``, the linear layers of GPT-2
and its relatives; found by class name, without importing ``transformers``, where its weight is
2-D). ``Conv1D`` stores its weight as ``(in, out)``, the transpose of ``nn.Linear``'s; budgets
use only the shape (``uniform``, ``erk`` and ``er`` scores are symmetric in the two dims), so
this changes nothing. Biases, norms and embeddings stay dense unless a glob in ``include``
names them. Parameters shared by several modules appear once, under the first name
``named_parameters`` gives them: a linear layer tied to an embedding (GPT-2's ``lm_head``,
whose weight is ``wte.weight``) makes that shared weight a target, once, under the
embedding's name; ``exclude`` keeps it dense.

A layer whose weight is computed from stored parameters is a target only where zeros in the
stored parameter are zeros in the computed weight:

* weight norm (``torch.nn.utils.parametrizations.weight_norm``, ``w = g * v / ||v||``): the
  target is ``v``, ``<layer>.parametrizations.weight.original1`` (``<layer>.weight_v`` for the
  deprecated hook-based ``torch.nn.utils.weight_norm``);
* spectral norm (``w = v / sigma``): the target is ``<layer>.parametrizations.weight.original``
  (``<layer>.weight_orig`` for the hook-based ``torch.nn.utils.spectral_norm``);

each only where it is the one parametrization of the weight. Masks and sparsity budgets then
apply to ``v``; a row of ``v`` pruned entirely makes weight norm's ``||v||`` zero, so that row
of the computed weight is NaN. Any other parametrization (``orthogonal``, a chain, a user
parametrization) or forward pre-hook that computes the weight does not keep zeros: the layer is
not a target, and one ``UserWarning`` names all such layers. Remove the parametrization
(``torch.nn.utils.parametrize.remove_parametrizations``) or, if zeros do survive it, name the
stored parameter with ``include``.

Weight-standardised convolutions (timm's ``StdConv2d``, ``StdConv2dSame``, ``ScaledStdConv2d``,
``ScaledStdConv2dSame``, found by class name) standardise the weight in the forward,
``(w - mean) / std``, so a zero in the stored weight is not a zero in the weight the forward
computes with. They are not default targets (one ``UserWarning`` names them); ``include`` can
still add them, and then they warn that the stored weight is sparse but the computation is not.
A layer whose weight parameters ``exclude`` names is not warned about.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from sparsetrain.core.errors import SparsityConfigError

log = logging.getLogger(__name__)

PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)  # fmt: skip
HF_CONV1D = "Conv1D"  # transformers.pytorch_utils.Conv1D: y = x @ W + b with W of shape (in, out)
WEIGHT_STANDARDISED = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")
# parametrizations / old-style hooks whose stored parameter keeps its zeros in the weight
_ZERO_KEEPING_PARAMETRIZATIONS = {
    parametrizations._WeightNorm: "parametrizations.weight.original1",  # v of w = g * v / ||v||
    parametrizations._SpectralNorm: "parametrizations.weight.original",  # v of w = v / sigma
}
_ZERO_KEEPING_HOOKS = {WeightNorm: "_v", SpectralNorm: "_orig"}
_COMPILE_PREFIX = "_orig_mod."


def clean_name(name: str) -> str:
    """Drop the ``_orig_mod.`` segments that ``torch.compile`` adds to parameter names."""
    return name.replace(_COMPILE_PREFIX, "")


def _as_list(globs: str | Sequence[str] | None) -> list[str]:
    if globs is None:
        return []
    if isinstance(globs, str):
        return [globs]
    return list(globs)


def _stored_weight(module: nn.Module) -> tuple[str | None, str]:
    """``(name, how)``: the parameter of ``module`` (relative name) to prune for its weight,
    or ``None`` if no stored parameter keeps its zeros in the weight; ``how`` says why."""
    if parametrize.is_parametrized(module, "weight"):
        chain = [type(p) for p in module.parametrizations.weight]
        how = " -> ".join(c.__name__ for c in chain)
        if len(chain) == 1 and chain[0] in _ZERO_KEEPING_PARAMETRIZATIONS:
            return _ZERO_KEEPING_PARAMETRIZATIONS[chain[0]], how
        return None, f"parametrization {how}"
    weight = getattr(module, "weight", None)
    if weight is None:
        return None, ""
    if isinstance(weight, nn.Parameter):
        return "weight", ""
    hooks = [h for h in module._forward_pre_hooks.values() if getattr(h, "name", None) == "weight"]
    if len(hooks) == 1 and type(hooks[0]) in _ZERO_KEEPING_HOOKS:
        return "weight" + _ZERO_KEEPING_HOOKS[type(hooks[0])], type(hooks[0]).__name__
    computed_by = [type(h).__name__ for h in module._forward_pre_hooks.values()]
    return None, f"weight not a stored parameter (forward pre-hooks: {', '.join(computed_by) or 'none'})"


def _is_prunable(module: nn.Module) -> bool:
    """A default target layer: one of ``PRUNABLE_MODULES``, or Hugging Face's ``Conv1D`` (by class
    name, so that ``transformers`` need not be installed) with a 2-D weight."""
    if isinstance(module, PRUNABLE_MODULES):
        return True
    if not any(c.__name__ == HF_CONV1D for c in type(module).__mro__):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.dim() == 2


def _is_weight_standardised(module: nn.Module) -> bool:
    return any(c.__name__ in WEIGHT_STANDARDISED for c in type(module).__mro__)


def _weight_param_ids(module: nn.Module) -> set[int]:
    """The parameters of ``module`` that hold (or compute) its weight: all but its bias."""
    return {id(p) for n, p in module.named_parameters() if n != "bias"}


def select_targets(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    dense_first: bool = False,
    dense_last: bool = False,
) -> dict[str, nn.Parameter]:
    """Return the prunable parameters of ``model`` as an ordered ``{name: parameter}``.

    The defaults, and what happens to parametrized and weight-standardised layers, are in the
    module docstring of :mod:`sparsetrain.core.targets`.

    Args:
        include: globs on parameter names (``fnmatch`` syntax) that are added to the
            default targets, e.g. ``"*.in_proj_weight"`` or ``"*.bias"``.
        exclude: globs on parameter names removed from the targets, e.g. ``"head.*"``.
        dense_first: keep the first default target (in registration order) dense.
        dense_last: keep the last default target dense (usually the classifier).

    Raises:
        SparsityConfigError: a glob matches no parameter, or nothing is left to prune.

    Warns:
        UserWarning: once for the layers skipped because a parametrization or hook computes
        their weight without keeping zeros, once for the weight-standardised convolutions.
    """
    include, exclude = _as_list(include), _as_list(exclude)
    default_ids: set[int] = set()
    skipped: list[tuple[str, nn.Module, str]] = []  # (layer, module, why)
    standardised: list[tuple[str, nn.Module]] = []
    for layer, module in model.named_modules():
        if not _is_prunable(module):
            continue
        layer = clean_name(layer)
        if _is_weight_standardised(module):
            standardised.append((layer, module))
            continue
        name, how = _stored_weight(module)
        if name is None:
            if how:
                skipped.append((layer, module, how))
        else:
            default_ids.add(id(module.get_parameter(name)))
            if name != "weight":
                log.info(
                    "%s: the weight is computed by %s, which keeps zeros; the target is its stored %r",
                    layer, how, f"{layer}.{name}" if layer else name,
                )  # fmt: skip
    named = [(clean_name(n), p) for n, p in model.named_parameters()]  # shared parameters appear once
    default = [(n, p) for n, p in named if id(p) in default_ids]
    if dense_first and default:
        default = default[1:]
    if dense_last and default:
        default = default[:-1]
    chosen = {id(p) for _, p in default}

    for key, globs in (("include", include), ("exclude", exclude)):
        for glob in globs:
            if not any(fnmatch.fnmatchcase(n, glob) for n, _ in named):
                raise SparsityConfigError(
                    f"{key}={glob!r} matches no parameter of {type(model).__name__}. "
                    f"Parameter names look like: {', '.join(n for n, _ in named[:6])}"
                    + (", ..." if len(named) > 6 else "")
                )
    for n, p in named:
        if any(fnmatch.fnmatchcase(n, g) for g in include):
            chosen.add(id(p))
    excluded = {id(p) for n, p in named if any(fnmatch.fnmatchcase(n, g) for g in exclude)}
    chosen -= excluded

    _warn_skipped(skipped, chosen | excluded)
    _warn_standardised(standardised, chosen, excluded)

    targets = {n: p for n, p in named if id(p) in chosen}
    if not targets:
        raise SparsityConfigError(
            f"{type(model).__name__} has no prunable weights: no Conv, ConvTranspose, Linear or Conv1D weight is left "
            f"after include={include}, exclude={exclude}, dense_first={dense_first}, dense_last={dense_last}. "
            "Name the parameters to prune with `include` (globs on parameter names)."
        )
    return targets


@dataclass(frozen=True)
class TargetSelection:
    """Which parameters a sparse run prunes: the default targets (see the module docstring), plus the
    parameters named by ``include`` globs, minus those named by ``exclude`` globs, without the first /
    last default target when ``dense_first`` / ``dense_last``. One object for the four arguments that the
    engine, the callback and the lottery take."""

    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    dense_first: bool = False
    dense_last: bool = False

    def select(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The targets of ``model`` (:func:`select_targets`)."""
        return select_targets(model, self.include, self.exclude, self.dense_first, self.dense_last)

    def includes(self, name: str) -> bool:
        """Whether an ``include`` glob names ``name`` (such a target is pruned even when frozen)."""
        return any(fnmatch.fnmatchcase(name, g) for g in _as_list(self.include))

    def changed(self) -> dict:
        """The arguments that differ from the defaults, ``{name: value}``."""
        return {k: v for k, v in vars(self).items() if v not in (None, False)}


def _warn_skipped(skipped: list[tuple[str, nn.Module, str]], addressed: set[int]) -> None:
    """One warning for the layers whose computed weight would not keep zeros, unless the user
    named one of their weight parameters with ``include`` or ``exclude``."""
    left = [f"{layer} ({why})" for layer, module, why in skipped if not _weight_param_ids(module) & addressed]
    if left:
        warnings.warn(
            f"{len(left)} layer(s) are not sparse targets because their weight is computed in a way that "
            f"does not keep zeros: {'; '.join(left)}. To prune such a weight, remove the parametrization "
            "(torch.nn.utils.parametrize.remove_parametrizations(module, 'weight'); for a hook, its remove_* "
            "function), or, if you know zeros in a stored parameter survive, name that parameter with `include` "
            "(e.g. include='<layer>.parametrizations.weight.original'); `exclude` silences this for a layer.",
            UserWarning,
            stacklevel=3,
        )


def _warn_standardised(standardised: list[tuple[str, nn.Module]], chosen: set[int], excluded: set[int]) -> None:
    """One warning for the weight-standardised convolutions, selected by ``include`` or not."""
    kept_out, included = [], []
    for layer, module in standardised:
        ids = _weight_param_ids(module)
        if ids & chosen:
            included.append(f"{layer} ({type(module).__name__})")
        elif not ids & excluded:
            kept_out.append(f"{layer} ({type(module).__name__})")
    parts = []
    if kept_out:
        parts.append(
            f"{len(kept_out)} weight-standardised convolution(s) are not sparse targets: {', '.join(kept_out)}. "
            "Their forward computes with the dense standardised weight (w - mean) / std, so zeros in the stored "
            "weight are not zeros in the forward. `include=` can still add them (e.g. include='<layer>.weight'); "
            "then the stored weight is sparse but the computation is not."
        )
    if included:
        parts.append(
            f"Weight-standardised convolution(s) selected by include: {', '.join(included)}; their stored weight "
            "is sparse but the forward computes with the dense standardised weight (w - mean) / std."
        )
    if parts:
        warnings.warn(" ".join(parts), UserWarning, stacklevel=3)
