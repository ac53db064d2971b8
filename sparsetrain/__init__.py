"""sparsetrain: neural networks made sparse while they train.

The engine (:class:`SparsityEngine`) needs only torch; the loops that drive it: :func:`attach` (any PyTorch loop,
Lightning Fabric), :class:`SparsityCallback` (a Lightning ``Trainer``; imported on first use, so the library
imports without Lightning) and :class:`sparsetrain.integrations.hf.SparsityTrainerCallback` (Hugging Face).
"""

import importlib
import importlib.util

from sparsetrain.checkpoint import consolidate_checkpoint
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.engine import SparsityEngine
from sparsetrain.integrations.loop import attach

_LIGHTNING = {"SparsityCallback": "sparsetrain.callback", "SparsityModelCheckpoint": "sparsetrain.integrations.lightning"}


def __getattr__(name: str):
    if name in _LIGHTNING:
        return getattr(importlib.import_module(_LIGHTNING[name]), name)
    raise AttributeError(f"module 'sparsetrain' has no attribute {name!r}")


def _has_lightning() -> bool:
    try:
        return importlib.util.find_spec("lightning") is not None
    except (ImportError, ValueError):  # sys.modules["lightning"] = None, or a broken install
        return False


__all__ = ["SparsityConfigError", "SparsityEngine", "attach", "consolidate_checkpoint"]
if _has_lightning():  # `from sparsetrain import *` works without Lightning too
    __all__ += list(_LIGHTNING)
__version__ = "0.3.0.dev0"
