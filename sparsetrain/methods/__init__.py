"""Sparsity methods: one class per algorithm, all with the :class:`SparsityMethod` interface.

Each class registers itself at its definition (:func:`~sparsetrain.methods.base.register_method`):
:data:`METHODS` maps the names a config or ``SparsityCallback("rigl", sparsity=0.9)`` may use to the
classes, with what each supports; :func:`method_from_name` builds one with its arguments.
"""

import inspect

from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.methods.base import METHODS, SparsityContext, SparsityMethod, register_method

# imported in the order METHODS lists them (simple to complex)
from sparsetrain.methods.dense import Dense  # isort: skip
from sparsetrain.methods.static import Static  # isort: skip
from sparsetrain.methods.gmp import GMP  # isort: skip
from sparsetrain.methods.rigl import RigL  # isort: skip
from sparsetrain.methods.set import SET  # isort: skip
from sparsetrain.methods.granet import GraNet  # isort: skip
from sparsetrain.methods.annealing import StochasticAnnealing  # isort: skip
from sparsetrain.methods.srste import SRSTE  # isort: skip
from sparsetrain.methods.fixed import FixedMasks  # isort: skip


def method_from_name(name: str, **args) -> SparsityMethod:
    """``method_from_name("rigl", sparsity=0.9)`` is ``RigL(sparsity=0.9)``; names are case-insensitive."""
    cls = METHODS.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise SparsityConfigError(f"method={name!r} is unknown; allowed: {', '.join(METHODS)} (or a SparsityMethod instance)")
    unknown = [k for k in args if k not in inspect.signature(cls).parameters]
    if unknown:
        raise SparsityConfigError(
            f"{cls.__name__} does not take {', '.join(f'{k}={args[k]!r}' for k in unknown)}; its arguments: "
            f"{', '.join(inspect.signature(cls).parameters)}"
        )
    return cls(**args)


__all__ = [
    "METHODS", "SET", "Dense", "FixedMasks", "GMP", "GraNet", "RigL", "SRSTE", "SparsityContext", "SparsityMethod", "Static",
    "StochasticAnnealing", "method_from_name", "register_method",
]
