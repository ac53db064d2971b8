"""Dense baseline: no masks, the callback only reports sparsity."""

from __future__ import annotations

from sparsetrain.methods.base import SparsityMethod, register_method


@register_method("dense")
class Dense(SparsityMethod):
    """Train dense; :class:`~sparsetrain.SparsityCallback` still logs the measured sparsity.

    Example::

        trainer = L.Trainer(callbacks=[SparsityCallback(Dense())])
    """
