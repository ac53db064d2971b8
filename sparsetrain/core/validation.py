"""Checks of configuration values, each raising :class:`SparsityConfigError` with one kind of message.

Every message names the key, the value given and what is allowed, e.g.
``power=nan must be a finite number`` or ``distribution='gaussian' is unknown; allowed: uniform, erk``.
Methods and the callback call these at construction, and once more at fit start for what
needs the model (targets) or the length of training (steps given as fractions).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from sparsetrain.core.errors import SparsityConfigError


def is_number(value) -> bool:
    """An ``int`` or ``float`` (not a ``bool``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_choice(value, key: str, allowed: Iterable[str]):
    """``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise SparsityConfigError(f"{key}={value!r} is unknown; allowed: {', '.join(allowed)}")
    return value


def check_number(
    value,
    key: str,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    meaning: str = "",
) -> float:
    """A finite number in the interval from ``low`` to ``high`` (open or closed at each end)."""
    if math.isfinite(low) and math.isfinite(high):
        span = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif math.isfinite(low):
        span = f" {'>' if low_open else '>='} {low:g}"
    elif math.isfinite(high):
        span = f" {'<' if high_open else '<='} {high:g}"
    else:
        span = ""
    what = f" ({meaning})" if meaning else ""
    if not is_number(value) or not math.isfinite(value):
        raise SparsityConfigError(f"{key}={value!r} must be a finite number{span}{what}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        raise SparsityConfigError(f"{key}={value!r} must be a number{span}{what}")
    return float(value)


def check_sparsity(value, key: str = "sparsity") -> float:
    """A sparsity in [0, 1): the fraction of weights set to zero."""
    return check_number(value, key, 0.0, 1.0, high_open=True, meaning="fraction of weights set to zero")


def check_bool(value, key: str) -> bool:
    """``True`` or ``False``."""
    if not isinstance(value, bool):
        raise SparsityConfigError(f"{key}={value!r} must be true or false")
    return value


def check_int(value, key: str, low: int = 0, meaning: str = "") -> int:
    """An ``int`` (not a ``bool``) ``>= low``."""
    what = f" ({meaning})" if meaning else ""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SparsityConfigError(f"{key}={value!r} must be an int >= {low}{what}")
    return value


def check_step(value, key: str, positive: bool = False) -> int | float:
    """A point of the schedule: an int (optimizer steps) or a float in [0, 1] (fraction of training).

    ``positive``: a length (``every``) that must not be 0: an int >= 1 or a float in (0, 1].
    """
    if not is_number(value) or (isinstance(value, float) and not math.isfinite(value)):
        raise SparsityConfigError(f"{key}={value!r} must be an int (optimizer steps) or a float in (0, 1] (fraction of training)")
    if isinstance(value, int):
        low = 1 if positive else 0
        if value < low:
            raise SparsityConfigError(f"{key}={value} must be >= {low} (an int counts optimizer steps)")
        return value
    if value == 0.0 and not positive:
        return value
    if not 0.0 < value <= 1.0:
        raise SparsityConfigError(
            f"{key}={value} is a float, so it is read as a fraction of training and must lie in (0, 1]; "
            "give an int to count optimizer steps"
        )
    return value


def check_globs(value, key: str) -> dict[str, float]:
    """A mapping of globs on target names to sparsities in [0, 1) (``overrides``)."""
    if value is None:
        return {}
    if not hasattr(value, "items"):
        raise SparsityConfigError(f"{key}={value!r} must be a mapping of globs on target names to sparsities")
    out = {}
    for glob, sparsity in value.items():
        if not isinstance(glob, str):
            raise SparsityConfigError(f"{key} key {glob!r} must be a string (a glob on target names)")
        out[glob] = check_sparsity(sparsity, f"{key}[{glob!r}]")
    return out
