"""sparsetrain: neural networks made sparse while they train, as one Lightning callback."""

from sparsetrain.callback import SparsityCallback
from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.sharded_checkpoint import consolidate_checkpoint

__all__ = ["SparsityCallback", "SparsityConfigError", "consolidate_checkpoint"]
__version__ = "0.2.0"
