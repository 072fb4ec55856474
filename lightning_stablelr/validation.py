"""Argument checks shared by every module (pure: no torch, no Lightning).

Each helper returns the validated value (as ``float``/``int``/``str``) or raises ``ValueError`` with a
message of the form::

    `<name>` must be <allowed range>, got <value>. <hint>

so that a user reading the error knows which argument is wrong, what was received and what to do.
NaN is rejected by every numeric check (``nan >= 0`` is False, but we do not rely on that: the checks
test ``math.isfinite`` explicitly). ``bool`` is not accepted where a number is expected, because
``True`` silently meaning ``1`` hides configuration mistakes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

__all__ = [
    "check_choice",
    "check_finite_positive",
    "check_in_range",
    "check_int_at_least",
    "check_non_negative",
]


def _fail(name: str, requirement: str, value: Any, hint: str | None) -> ValueError:
    message = f"`{name}` must be {requirement}, got {value!r}."
    if hint:
        message += f" {hint}"
    return ValueError(message)


def _as_real(name: str, value: Any, requirement: str, hint: str | None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _fail(name, requirement, value, hint)
    result = float(value)
    if not math.isfinite(result):
        raise _fail(name, requirement, value, hint)
    return result


def check_finite_positive(name: str, value: Any, hint: str | None = None) -> float:
    """Return ``float(value)`` if it is a finite real number ``> 0``; otherwise raise ``ValueError``."""
    requirement = "a finite number > 0"
    result = _as_real(name, value, requirement, hint)
    if result <= 0:
        raise _fail(name, requirement, value, hint)
    return result


def check_non_negative(name: str, value: Any, hint: str | None = None) -> float:
    """Return ``float(value)`` if it is a finite real number ``>= 0``; otherwise raise ``ValueError``."""
    requirement = "a finite number >= 0"
    result = _as_real(name, value, requirement, hint)
    if result < 0:
        raise _fail(name, requirement, value, hint)
    return result


def check_in_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    hint: str | None = None,
) -> float:
    """Return ``float(value)`` if it is finite and inside the interval; otherwise raise ``ValueError``.

    The interval is ``[low, high]`` by default; ``low_inclusive``/``high_inclusive`` open either end.
    ``high`` may be ``math.inf`` (the value itself must still be finite).
    """
    left = "[" if low_inclusive else "("
    right = "]" if high_inclusive else ")"
    requirement = f"a finite number in {left}{low:g}, {high:g}{right}"
    result = _as_real(name, value, requirement, hint)
    above_low = result >= low if low_inclusive else result > low
    below_high = result <= high if high_inclusive else result < high
    if not (above_low and below_high):
        raise _fail(name, requirement, value, hint)
    return result


def check_int_at_least(name: str, value: Any, minimum: int, hint: str | None = None) -> int:
    """Return ``int(value)`` if it is an integer (not a bool) ``>= minimum``; otherwise raise ``ValueError``."""
    requirement = f"an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise _fail(name, requirement, value, hint)
    return int(value)


def check_choice(name: str, value: Any, choices: Iterable[Any], hint: str | None = None) -> Any:
    """Return ``value`` if it is one of ``choices``; otherwise raise ``ValueError`` listing them."""
    options = list(choices)
    if value not in options:
        listed = ", ".join(repr(option) for option in options)
        raise _fail(name, f"one of {listed}", value, hint)
    return value
