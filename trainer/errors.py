"""The one exception type for bad user input, and the checks that raise it."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

INT32_MAX = 2**31 - 1  # step counts travel as int32 tensors
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32


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
    if not _finite(value) or value < 0:
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
        or not (_finite(value) and value > 0)
    ):
        raise ConfigError(f"`{argument}` ({value!r}) must be a positive number.")
    return float(value)


def check_float32(argument: str, value: float) -> float:
    """Returns `value` if float32 holds it as zero or a normal number: not overflowing to
    inf, and not a non-zero value that rounds to 0 or to a subnormal number, which
    TensorFlow's CPU kernels flush to zero (a strength of 1e-40 would act as 0).

    Args:
      argument: the name shown in the error.
      value: a finite float (see `check_non_negative`).

    Raises:
      ConfigError: naming `argument` and the float32 range.
    """
    try:
        rounded = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond FLOAT32_MAX by more than half a float32 step
        rounded = math.inf
    if abs(rounded) > FLOAT32_MAX:
        raise ConfigError(
            f"`{argument}` ({value!r}) is not representable in float32 (max {FLOAT32_MAX:.2g})."
        )
    if value != 0 and abs(rounded) < FLOAT32_TINY:
        raise ConfigError(
            f"`{argument}` ({value!r}) is not representable in float32 (smallest normal "
            f"{FLOAT32_TINY:.2g}; TensorFlow computes smaller values as 0): use 0 or at least "
            f"{FLOAT32_TINY:.2g}."
        )
    return value


def _finite(value: int | float) -> bool:
    """Whether `value` is finite as a float (an int too large for a float is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
