"""The one exception type for bad user input, and the checks that raise it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

INT32_MAX = 2**31 - 1  # step counts travel as int32 tensors


class ConfigError(ValueError):
    """Bad input from the user: the message names the bad value and what would be valid.

    The CLI turns it into one line on stderr and exit status 2; library users get a
    `ValueError` they can catch.
    """


def check_integer(argument: str, value: Any, low: int, high: int = INT32_MAX) -> int:
    """Returns `value` if it is an integer in `[low, high]` (not a bool).

    Raises:
      ConfigError: naming `argument` and the valid range.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"`{argument}` ({value!r}) must be an integer from {low} to {high}.")
    return value


def check_choice(argument: str, value: Any, choices: Sequence[Any]) -> Any:
    """Returns `value` if it is one of `choices`.

    Raises:
      ConfigError: naming `argument` and listing the choices.
    """
    if value not in choices:
        listed = ", ".join(c if isinstance(c, str) else repr(c) for c in choices)
        raise ConfigError(f"`{argument}` ({value!r}) must be one of {listed}.")
    return value


def check_non_negative(argument: str, value: Any) -> float:
    """Returns `value` as a float if it is a finite number ≥ 0 (not a bool).

    Raises:
      ConfigError: naming `argument`.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"`{argument}` ({value!r}) must be a non-negative number.")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"`{argument}` ({value!r}) must be a non-negative finite number.")
    return float(value)


def check_positive(argument: str, value: Any) -> float:
    """Returns `value` as a float if it is a finite number > 0 (not a bool).

    Raises:
      ConfigError: naming `argument`.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ConfigError(f"`{argument}` ({value!r}) must be a positive number.")
    return float(value)
