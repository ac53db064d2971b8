"""sparsetrain: neural networks made sparse while they train, as one Lightning callback."""

from sparsetrain.callback import SparsityCallback, consolidate_checkpoint
from sparsetrain.core.errors import SparsityConfigError

__all__ = ["SparsityCallback", "SparsityConfigError", "consolidate_checkpoint"]
__version__ = "0.2.0"
