"""Which parameters are prunable.

By default the targets are the ``weight`` of every convolution (``Conv1d/2d/3d``) and
linear layer (``nn.Linear`` and its subclasses, which covers timm's and torchvision's
layers and ``MultiheadAttention.out_proj``). Biases, norms and embeddings stay dense
unless a glob in ``include`` names them. Parameters shared by several modules appear
once, under the first name ``named_parameters`` gives them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from sparsetrain.core.errors import SparsityConfigError

PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
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


def select_targets(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    dense_first: bool = False,
    dense_last: bool = False,
) -> dict[str, nn.Parameter]:
    """Return the prunable parameters of ``model`` as an ordered ``{name: parameter}``.

    Args:
        include: globs on parameter names (``fnmatch`` syntax) that are added to the
            default targets, e.g. ``"*.in_proj_weight"`` or ``"*.bias"``.
        exclude: globs on parameter names removed from the targets, e.g. ``"head.*"``.
        dense_first: keep the first default target (in registration order) dense.
        dense_last: keep the last default target dense (usually the classifier).

    Raises:
        SparsityConfigError: a glob matches no parameter, or nothing is left to prune.
    """
    include, exclude = _as_list(include), _as_list(exclude)
    default_ids = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, PRUNABLE_MODULES) and isinstance(getattr(module, "weight", None), nn.Parameter)
    }
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
    for n, p in named:
        if any(fnmatch.fnmatchcase(n, g) for g in exclude):
            chosen.discard(id(p))

    targets = {n: p for n, p in named if id(p) in chosen}
    if not targets:
        raise SparsityConfigError(
            f"{type(model).__name__} has no prunable weights: no Conv1d/2d/3d or Linear weight is left "
            f"after include={include}, exclude={exclude}, dense_first={dense_first}, dense_last={dense_last}. "
            "Name the parameters to prune with `include` (globs on parameter names)."
        )
    return targets
