"""sparsetrain: neural networks made sparse while they train, as one Lightning callback."""

from sparsetrain.callback import SparsityCallback
from sparsetrain.core.errors import SparsityConfigError

__all__ = ["SparsityCallback", "SparsityConfigError"]
__version__ = "0.2.0"
