"""The one rule for the numbers callers give: deadlines, waits, intervals.

Every entry point (CLI options, HTTP bodies and query parameters, batch lines,
``ToolQueue`` arguments, ``MCPQ_*`` settings) checks its numbers here and
wraps the :class:`ValueError` in its own kind of error: a usage error (exit
2), a 422, an ``invalid_arguments`` result line, a config error.
"""

from __future__ import annotations

import math
from typing import Any

#: A deadline or wait longer than this is a mistake, not a plan (and would
#: overflow the broker's countdowns): 30 days.
MAX_SECONDS = 30 * 86_400.0


def seconds(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """``value`` as a number of seconds, or a ValueError a person can act on.

    Refused: non-numbers (booleans too), NaN, infinities, negative numbers,
    zero unless ``allow_zero``, and more than :data:`MAX_SECONDS`.

    :param value: what the caller gave (a float, an int, or a numeric string from a command line).
    :param name: how the caller spelt it (``--timeout``, ``timeout``, ``MCPQ_CLAIM_LEASE``).
    :param allow_zero: whether 0 is meaningful (a wait of 0 asks once without waiting).
    """
    kind = "non-negative" if allow_zero else "positive"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{name} must be a {kind} number of seconds, got {type(value).__name__}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"{name} must be a {kind} number of seconds, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite {kind} number of seconds, got {value!r}")
    if number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"{name} must be a {kind} number of seconds, got {value!r}")
    if number > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS:.0f} seconds (30 days), got {value!r}")
    return number


def optional_seconds(value: Any, name: str, *, allow_zero: bool = False) -> float | None:
    """:func:`seconds`, with ``None`` meaning "the default"."""
    return None if value is None else seconds(value, name, allow_zero=allow_zero)
