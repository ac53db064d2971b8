"""Sparsity methods: one class per algorithm, all with the :class:`SparsityMethod` interface."""

from sparsetrain.methods.base import SparsityContext, SparsityMethod
from sparsetrain.methods.dense import Dense
from sparsetrain.methods.gmp import GMP
from sparsetrain.methods.lottery import FixedMasks
from sparsetrain.methods.granet import GraNet
from sparsetrain.methods.rigl import RigL
from sparsetrain.methods.set import SET
from sparsetrain.methods.static import Static

__all__ = ["GMP", "Dense", "SparsityContext", "SparsityMethod", "Static"]
__all__ += ["GraNet", "RigL", "SET"]
__all__ += ["FixedMasks"]
from sparsetrain.methods.annealing import StochasticAnnealing  # noqa: E402
__all__ += ["StochasticAnnealing"]
