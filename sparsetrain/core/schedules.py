"""Sparsity schedules and update steps as pure functions of the optimizer step.

Step ``t`` means "after ``t`` optimizer steps" (Lightning's ``trainer.global_step`` right
after an optimizer step, all optimizers counted); ``t = 0`` is fit start, before any step.
:class:`UpdateSchedule` is the one object every method uses to say when it updates its masks.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace

from sparsetrain.core.errors import SparsityConfigError
from sparsetrain.core.validation import check_choice, check_sparsity, check_step  # noqa: F401 (check_sparsity re-exported)

SCHEDULES = ("constant", "linear", "cubic")


def resolve_step(value: int | float, total_steps: int | None, key: str) -> int:
    """Turn a step given as an int (steps) or a float in (0, 1] (fraction of training) into steps.

    ``0`` (int or float) is step 0. Fractions round to the nearest step.
    """
    check_step(value, key)
    if isinstance(value, int) or value == 0:
        return int(value)
    if total_steps is None or not math.isfinite(total_steps):
        raise SparsityConfigError(
            f"{key}={value} is a fraction of training, but the length of training is unknown "
            f"(data of unknown length and no max_steps): set max_steps on the Trainer (total_steps= in "
            f"sparsetrain.attach without a Trainer), or give {key} as an int number of optimizer steps"
        )
    return int(round(value * total_steps))


@dataclass(frozen=True)
class UpdateSchedule:
    """When a method updates its masks: after optimizer steps ``start, start + every, ...`` up to ``end``.

    The rule, the same for every method: an update fires after optimizer step ``t`` when
    ``t >= 1``, ``start <= t <= end`` and ``(t - start) % every == 0``, and also at ``t == end``
    when ``land_on_end`` (so a schedule that must reach its final value there does). Step 0 is
    fit start, where the method's ``init_masks`` runs instead. ``every=None`` means no periodic
    updates: only ``start`` (if it is >= 1) and ``end``.

    ``start``, ``end`` and ``every`` are ints (optimizer steps) or floats in (0, 1] (fractions of
    training); :meth:`resolve` turns them into steps once, against the real number of optimizer
    steps of the fit, and warns (the same words for every method) when ``end`` lies beyond the
    run or when no update would fire in it. ``names`` are the keys the user wrote (e.g.
    ``regrowth_end`` for ``end``), used in messages.

    Example::

        >>> s = UpdateSchedule(start=10, end=0.95, every=20).resolve(100)
        >>> [t for t in range(101) if s.is_update_step(t)]
        [10, 30, 50, 70, 90, 95]
    """

    start: int | float = 0
    end: int | float = 0.75
    every: int | float | None = 100
    land_on_end: bool = True
    names: tuple[str, str, str] = field(default=("start", "end", "every"), compare=False, repr=False)
    total_steps: int | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        start_key, end_key, every_key = self.names
        check_step(self.start, start_key)
        check_step(self.end, end_key)
        if self.every is not None:
            check_step(self.every, every_key, positive=True)
        if isinstance(self.start, int) and isinstance(self.end, int) and self.end < self.start:  # floats: at resolve
            raise SparsityConfigError(f"{end_key}={self.end} is before {start_key}={self.start}; {end_key} must be >= {start_key}")

    @property
    def uses_fractions(self) -> bool:
        return any(isinstance(v, float) and v != 0 for v in (self.start, self.end, self.every))

    @property
    def resolved(self) -> bool:
        return not self.uses_fractions

    def resolve(self, total_steps: int | None) -> UpdateSchedule:
        """The same schedule in optimizer steps of a fit with ``total_steps`` steps (``None``: unknown)."""
        start_key, end_key, every_key = self.names
        start = resolve_step(self.start, total_steps, start_key)
        end = resolve_step(self.end, total_steps, end_key)
        every = None if self.every is None else max(1, resolve_step(self.every, total_steps, every_key))
        if end < start:
            raise SparsityConfigError(
                f"{end_key}={self.end} ({end} steps) is before {start_key}={self.start} ({start} steps)"
            )
        out = replace(self, start=start, end=end, every=every, total_steps=total_steps)
        if total_steps is not None:
            if end > total_steps:
                warnings.warn(
                    f"{end_key}={self.end} is step {end}, beyond the {total_steps} optimizer steps of this fit: the "
                    "schedule will not finish in this fit (expected only if you resume into a longer run later)",
                    stacklevel=3,
                )
            elif end >= 1 and (out.next_update(0) or total_steps + 1) > total_steps:
                first = out.next_update(0)
                why = f"the first would come after step {first}" if first else f"{every_key} is longer than the window"
                warnings.warn(
                    f"{every_key}={self.every}, {start_key}={self.start}, {end_key}={self.end}: no update fires in the "
                    f"{total_steps} optimizer steps of this fit ({why})",
                    stacklevel=3,
                )
        return out

    def _steps(self) -> tuple[int, int, int | None]:
        if not self.resolved:
            raise RuntimeError("UpdateSchedule holds fractions of training: call resolve(total_steps) first")
        return int(self.start), int(self.end), None if self.every is None else int(self.every)

    def is_update_step(self, step: int) -> bool:
        start, end, every = self._steps()
        if step < 1 or step < start or step > end:
            return False
        on_grid = step == start if every is None else (step - start) % every == 0
        return on_grid or (self.land_on_end and step == end)

    def next_update(self, after: int) -> int | None:
        """The first update step ``> after`` (``None`` if there is none)."""
        start, end, every = self._steps()
        t = max(after + 1, 1, start)
        if every is not None:
            t = start + math.ceil((t - start) / every) * every
        elif t > start:
            t = end + 1
        if t <= end:
            return t
        return end if self.land_on_end and after < end and end >= 1 else None

    def progress(self, step: int, origin: int | None = None) -> float:
        """How far along ``[origin, end]`` the step is, in [0, 1] (``origin`` defaults to ``start``)."""
        start, end, _ = self._steps()
        origin = start if origin is None else origin
        if step >= end:
            return 1.0
        if step <= origin:
            return 0.0
        return (step - origin) / (end - origin)


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
    """True at ``start``, ``start + every``, ... up to ``end``, and always at ``end`` itself (steps >= 1).

    The rule of :meth:`UpdateSchedule.is_update_step`, for steps already resolved.
    """
    return UpdateSchedule(start, end, every).is_update_step(step)


def cosine_decay(step: int, initial: float, end: int, start: int = 0) -> float:
    """``initial / 2 * (1 + cos(pi * (t - start) / (end - start)))``: ``initial`` at ``start``, 0 at ``end``."""
    if step >= end:
        return 0.0
    if step <= start:
        return initial
    return 0.5 * initial * (1.0 + math.cos(math.pi * (step - start) / (end - start)))
