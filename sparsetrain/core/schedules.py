"""Sparsity schedules as pure functions of the optimizer step, and step arithmetic.

Step ``t`` means "after ``t`` optimizer steps" (Lightning's ``trainer.global_step`` right
after an optimizer step); ``t = 0`` is fit start, before any step.
"""

from __future__ import annotations

import math
import warnings

from sparsetrain.core.errors import SparsityConfigError

SCHEDULES = ("constant", "linear", "cubic")


def resolve_step(value: int | float, total_steps: int | None, key: str) -> int:
    """Turn a step given as an int (steps) or a float in (0, 1] (fraction of training) into steps.

    ``0`` (int or float) is step 0. Fractions round to the nearest step.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SparsityConfigError(f"{key}={value!r} must be an int (steps) or a float in (0, 1] (fraction of training)")
    if isinstance(value, int) or value == 0:
        if value < 0:
            raise SparsityConfigError(f"{key}={value} must be >= 0 (an int counts optimizer steps)")
        return int(value)
    if not 0.0 < value <= 1.0:
        raise SparsityConfigError(
            f"{key}={value} is a float, so it is read as a fraction of training and must lie in (0, 1]; "
            "give an int to count optimizer steps"
        )
    if total_steps is None or not math.isfinite(total_steps):
        raise SparsityConfigError(
            f"{key}={value} is a fraction of training, but the length of training is unknown "
            "(set max_epochs or max_steps on the Trainer, or give {key} as an int number of steps)"
        )
    return int(round(value * total_steps))


def warn_if_beyond_training(step: int, total_steps: int | None, key: str, value) -> None:
    """Warn when a schedule point lies past the end of this fit (fine only if the run is resumed later)."""
    if total_steps is not None and step > total_steps:
        warnings.warn(
            f"{key}={value} is step {step}, beyond the {total_steps} optimizer steps of this fit: the schedule "
            "will not finish in this fit (expected only if you resume into a longer run later)",
            stacklevel=3,
        )


def check_sparsity(value: float, key: str = "sparsity") -> float:
    """Validate a sparsity in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise SparsityConfigError(f"{key}={value!r} must be a number in [0, 1) (fraction of weights set to zero)")
    return float(value)


def scheduled_sparsity(
    step: int, initial: float, final: float, start: int, end: int, kind: str = "cubic"
) -> float:
    """Sparsity at ``step`` moving from ``initial`` at ``start`` to ``final`` at ``end``.

    ``cubic`` (Zhu & Gupta 2017): ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0)) ** 3``;
    ``linear``: ``s_t = s_i + (s_f - s_i) * (t - t0) / (t_end - t0)``; ``constant``: ``s_f`` at
    every step. Before ``start`` the value is ``initial``, from ``end`` on it is ``final``
    exactly (for ``start == end`` the jump happens at ``start``).
    """
    if kind not in SCHEDULES:
        raise SparsityConfigError(f"schedule={kind!r} is unknown; allowed: {', '.join(SCHEDULES)}")
    if kind == "constant" or step >= end:
        return final
    if step <= start:
        return initial
    progress = (step - start) / (end - start)
    if kind == "linear":
        return initial + (final - initial) * progress
    return final + (initial - final) * (1.0 - progress) ** 3


def is_update_step(step: int, start: int, end: int, every: int) -> bool:
    """True at ``start``, ``start + every``, ... up to ``end``, and always at ``end`` itself."""
    if step < start or step > end:
        return False
    return (step - start) % every == 0 or step == end


def cosine_decay(step: int, initial: float, end: int, start: int = 0) -> float:
    """``initial / 2 * (1 + cos(pi * (t - start) / (end - start)))``: ``initial`` at ``start``, 0 at ``end``."""
    if step >= end:
        return 0.0
    if step <= start:
        return initial
    return 0.5 * initial * (1.0 + math.cos(math.pi * (step - start) / (end - start)))
