"""Sparsity methods: one class per algorithm, all with the :class:`SparsityMethod` interface.

:data:`METHODS` maps the names a config or ``SparsityCallback("rigl", sparsity=0.9)`` may use to
the classes; :func:`method_from_name` builds one with its arguments.
"""

from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.methods.annealing import StochasticAnnealing
from sparsetrain.methods.base import SparsityContext, SparsityMethod
from sparsetrain.methods.dense import Dense
from sparsetrain.methods.gmp import GMP
from sparsetrain.methods.granet import GraNet
from sparsetrain.methods.fixed import FixedMasks
from sparsetrain.methods.rigl import RigL
from sparsetrain.methods.set import SET
from sparsetrain.methods.srste import SRSTE
from sparsetrain.methods.static import Static

METHODS: dict[str, type[SparsityMethod]] = {
    "dense": Dense,
    "static": Static,
    "gmp": GMP,
    "rigl": RigL,
    "set": SET,
    "granet": GraNet,
    "annealing": StochasticAnnealing,
    "srste": SRSTE,
    "fixed": FixedMasks,
}


def method_from_name(name: str, **args) -> SparsityMethod:
    """``method_from_name("rigl", sparsity=0.9)`` is ``RigL(sparsity=0.9)``; names are case-insensitive."""
    cls = METHODS.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise SparsityConfigError(f"method={name!r} is unknown; allowed: {', '.join(METHODS)} (or a SparsityMethod instance)")
    try:
        return cls(**args)
    except TypeError as err:  # an argument the method does not take
        raise SparsityConfigError(f"{cls.__name__} does not take {err}".replace(f"{cls.__name__}.__init__() ", "")) from None


__all__ = [
    "METHODS", "SET", "Dense", "FixedMasks", "GMP", "GraNet", "RigL", "SRSTE", "SparsityContext", "SparsityMethod", "Static",
    "StochasticAnnealing", "method_from_name",
]
