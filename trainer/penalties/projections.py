"""The built-in projections after the optimizer's update: max_norm, unit_norm, non_neg."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from trainer.cli.registry import register_penalty
from trainer.errors import ConfigError, check_float32, check_positive
from trainer.penalties.base import Penalty, Strength
from trainer.penalties.selection import variable_path

Axis = int | Sequence[int]


class PositiveStrength(Strength):
    """A `Strength` that must be > 0 (a norm bound: 0 would zero the weights)."""

    def check(self, value: Any) -> float:
        return check_float32(self.name, check_positive(self.name, value))


class Projection(Penalty):
    """A projection of each selected variable after the optimizer's update, as a Keras
    `Constraint` (`w ← constraint(w)`, which Keras' optimizer applies after its update).

    Subclasses implement `projected(w)`, the new value of one variable. By default the
    selection is the variables with ndim ≥ 2 (kernels; not biases or normalization scales).
    """

    def default_selection(self, variable: Any) -> bool:
        return len(variable.shape) >= 2

    def projected(self, w: tf.Tensor) -> tf.Tensor:
        """The projected value of one variable's weights `w`."""
        raise NotImplementedError

    def project(self, variables: Sequence[Any]) -> None:
        for v in variables:
            v.assign(tf.cast(self.projected(tf.convert_to_tensor(v)), v.dtype))


class _NormProjection(Projection):
    """A projection computed from the L2 norms along `axis`, as Keras' norm constraints."""

    def __init__(self, *, axis: Axis = 0, **selection: Any):
        super().__init__(**selection)
        self.axis = _check_axis(axis)

    def build(self, variables: Sequence[Any]) -> None:
        """Checks that `axis` exists in every selected variable, then builds.

        Raises:
          ConfigError: naming the variable, its shape and `axis`.
        """
        axes = [self.axis] if isinstance(self.axis, int) else list(self.axis)
        for v in variables:
            rank = len(v.shape)
            if any(not -rank <= a < rank for a in axes):
                raise ConfigError(
                    f"{self!r}: `axis` ({self.axis!r}) is out of range for "
                    f"{variable_path(v)!r} of shape {tuple(v.shape)}; exclude it or pick "
                    f"axes below {rank}."
                )
        super().build(variables)

    def norms(self, w: tf.Tensor) -> tf.Tensor:
        """The L2 norms of `w` along `axis`, kept as size-1 dimensions."""
        axis = self.axis if isinstance(self.axis, int) else list(self.axis)
        return tf.sqrt(tf.reduce_sum(tf.square(w), axis=axis, keepdims=True))

    def params(self) -> dict[str, Any]:
        return {**super().params(), "axis": self.axis}


@register_penalty("max_norm")
class MaxNorm(_NormProjection):
    """Rescales each weight vector along `axis` to a norm of at most `max_value`.

    `w ← w · clip(‖w‖, 0, c) / (ε + ‖w‖)`, `ε` Keras' `epsilon()`: Keras'
    `keras.constraints.MaxNorm(c, axis)` (Srivastava et al., "Dropout", JMLR 2014, §5.1),
    applied after the optimizer's update. For a Dense kernel `(inputs, units)`, `axis=0`
    bounds each unit's incoming weights.

    Args:
      max_value: c, the largest norm, a finite number > 0; a strength (sweepable).
      axis: an axis, or a list of axes, along which norms are taken (`[0, 1, 2]` for each
        filter of a Conv2D kernel).
      **selection: `include`, `exclude` (by default variables with ndim ≥ 2), `name`; see
        `Penalty`.

    Raises:
      ConfigError: `max_value` is not a finite number > 0, or `axis` not an int or a list of
        ints.
    """

    max_value = PositiveStrength()

    def __init__(self, max_value: float = 2.0, *, axis: Axis = 0, **selection: Any):
        super().__init__(axis=axis, **selection)
        self.max_value = max_value

    def projected(self, w: tf.Tensor) -> tf.Tensor:
        norms = self.norms(w)
        desired = tf.clip_by_value(norms, 0.0, tf.cast(self.max_value, norms.dtype))
        return w * (desired / (keras.config.epsilon() + norms))


@register_penalty("unit_norm")
class UnitNorm(_NormProjection):
    """Rescales each weight vector along `axis` to unit norm: `w ← w / (ε + ‖w‖)`, Keras'
    `keras.constraints.UnitNorm(axis)`, after the optimizer's update.

    Args:
      axis: an axis, or a list of axes, along which norms are taken.
      **selection: `include`, `exclude` (by default variables with ndim ≥ 2), `name`; see
        `Penalty`.

    Raises:
      ConfigError: `axis` is not an int or a list of ints.
    """

    def __init__(self, *, axis: Axis = 0, **selection: Any):
        super().__init__(axis=axis, **selection)

    def projected(self, w: tf.Tensor) -> tf.Tensor:
        return w / (keras.config.epsilon() + self.norms(w))


@register_penalty("non_neg")
class NonNeg(Projection):
    """Sets negative weights to zero: `w ← max(w, 0)`, Keras' `keras.constraints.NonNeg()`,
    after the optimizer's update.

    Args:
      **selection: `include`, `exclude` (by default variables with ndim ≥ 2), `name`; see
        `Penalty`.
    """

    def projected(self, w: tf.Tensor) -> tf.Tensor:
        return tf.maximum(w, tf.zeros([], w.dtype))


def _check_axis(axis: Any) -> int | tuple[int, ...]:
    """`axis` if it is an int, or a non-empty list or tuple of distinct ints (as a tuple).

    Raises:
      ConfigError: naming `axis` and its value.
    """
    if isinstance(axis, int) and not isinstance(axis, bool):
        return axis
    if (
        isinstance(axis, (list, tuple))
        and axis
        and all(isinstance(a, int) and not isinstance(a, bool) for a in axis)
        and len(set(axis)) == len(axis)
    ):
        return tuple(axis)
    raise ConfigError(
        f"`axis` ({axis!r}) must be an int or a non-empty list of distinct ints, e.g. 0 or "
        "[0, 1, 2]."
    )
