"""Layers left almost empty: fewer kept weights than the units they have to connect.

A target that keeps ``k`` weights and has ``n > k`` units along dim 0 or dim 1 of its shape
(output and input units of a ``Linear`` or a convolution) leaves at least ``n - k`` of those
units without any weight, wherever the ``k`` weights are: an output unit whose output is its
bias alone, or an input that nothing reads. No training can undo that. It is a property of the
counts, not of where the weights sit, so it never flags a mask that learned to drop useless
inputs while it had enough weights to keep them.

Uniform budgets do this to small first and last layers at high sparsity (a 40-500-500-10 MLP at
98 % keeps 400 first-layer weights for 500 hidden units and 100 last-layer weights for 500 hidden
units); a global magnitude threshold can do it to a layer whose weights are small. ERK budgets
give such layers more weights.
"""

from __future__ import annotations

from collections.abc import Mapping

#: warn when at least this fraction of a layer's units along a dim must be empty
STARVED_FRACTION = 0.1


def starved_layers(counts: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """``{name: reason}`` for every target whose kept count leaves at least :data:`STARVED_FRACTION`
    of its units along dim 0 or dim 1 without a weight; 1-D targets are never starved."""
    starved = {}
    for name, kept in counts.items():
        shape = tuple(shapes[name])
        reasons = [
            f"fewer than its {units} units along dim {dim}: at least {units - kept} of them have no weight"
            for dim, units in enumerate(shape[:2])
            if len(shape) >= 2 and units - kept >= STARVED_FRACTION * units
        ]
        if reasons:
            starved[name] = f"{name} {shape} keeps {kept} weights, " + "; ".join(reasons)
    return starved


def starved_message(starved: Mapping[str, str], when: str) -> str:
    """The warning for :func:`starved_layers`' result, ``when`` e.g. ``"at sparsity 0.98"``."""
    return (
        f"{when} {len(starved)} target(s) keep fewer weights than units to connect, so some units are cut off "
        "whatever the mask: " + " | ".join(starved.values()) + ". Give them more weights: distribution='erk', "
        "overrides={name: lower sparsity}, or leave them dense (dense_first / dense_last / exclude)"
    )
