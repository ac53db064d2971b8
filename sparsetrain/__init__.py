"""sparsetrain: neural networks made sparse while they train.

The engine (:class:`SparsityEngine`) needs only torch; the loops that drive it: :func:`attach` (any PyTorch loop,
Lightning Fabric), :class:`SparsityCallback` (a Lightning ``Trainer``; imported on first use, so the library
imports without Lightning) and :class:`sparsetrain.integrations.hf.SparsityTrainerCallback` (Hugging Face).
"""

from sparsetrain.checkpoint import consolidate_checkpoint
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.engine import SparsityEngine
from sparsetrain.integrations.loop import attach

_LIGHTNING = {"SparsityCallback": "sparsetrain.callback", "SparsityModelCheckpoint": "sparsetrain.integrations.lightning"}


def __getattr__(name: str):
    if name in _LIGHTNING:
        import importlib

        return getattr(importlib.import_module(_LIGHTNING[name]), name)
    raise AttributeError(f"module 'sparsetrain' has no attribute {name!r}")


__all__ = ["SparsityCallback", "SparsityConfigError", "SparsityEngine", "SparsityModelCheckpoint", "attach", "consolidate_checkpoint"]
__version__ = "0.3.0.dev0"
