"""Penalties whose `loss()` returns the wrong kind of term, loaded with `--import=loss_term_plugin`.

`vector_loss` returns a vector, `float64_loss` a float64 scalar and `none_loss` None; the
Trainer must refuse each when it is built, naming the penalty (`penalties.check_loss_term`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from trainer import Penalty, Strength, register_penalty


class _SquaresPenalty(Penalty):
    """`scale · Σ w²` per variable, as a vector: the subclasses return it in a wrong form."""

    scale = Strength()
    has_loss = True

    def __init__(self, scale: float = 0.01, **selection: Any):
        super().__init__(**selection)
        self.scale = scale

    def loss(self, variables: Sequence[Any]) -> tf.Tensor:
        return self.scale * tf.stack([tf.reduce_sum(tf.square(v)) for v in variables])


@register_penalty("vector_loss")
class VectorLoss(_SquaresPenalty):
    """Returns one term per variable: a float32 vector."""


@register_penalty("float64_loss")
class Float64Loss(_SquaresPenalty):
    """Returns the sum as a float64 scalar."""

    def loss(self, variables: Sequence[Any]) -> tf.Tensor:
        return tf.cast(tf.reduce_sum(super().loss(variables)), tf.float64)


@register_penalty("none_loss")
class NoneLoss(_SquaresPenalty):
    """Forgets to return its term."""

    def loss(self, variables: Sequence[Any]) -> None:
        super().loss(variables)
