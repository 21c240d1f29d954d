"""Two penalty plugins written only against tapeloop's public API: L1 and L2-SP.

They show what a user's plugin looks like; the `tasks` package imports this module, so both
are selectable from the command line: `--penalty="l1(1e-5)"`, `--penalty="l2sp(1e-3)"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from trainer import Penalty, Strength, register_penalty


@register_penalty("l1")
class L1(Penalty):
    """`scale · Σ|w|` over the selected variables (all trainable ones by default).

    Drives weights to exactly zero under proximal methods and towards it under SGD; the
    (sub)gradient is `scale · sign(w)`.

    Args:
      scale: a non-negative number.
      **selection: `include`, `exclude`, `name`; see `Penalty`.
    """

    scale = Strength()

    def __init__(self, scale: float = 1e-5, **selection: Any):
        super().__init__(**selection)
        self.scale = scale

    def loss(self, variables: Sequence[Any]) -> tf.Tensor:
        terms = [tf.reduce_sum(tf.abs(tf.cast(v, tf.float32))) for v in variables]
        return self.scale * tf.add_n(terms or [tf.constant(0.0)])


@register_penalty("l2sp")
class L2SP(Penalty):
    """L2 toward the starting point: `scale · Σ‖w − w₀‖²` (Li, Grandvalet & Davoine, 2018).

    `w₀` are the weights when the penalty is built, i.e. right after `build_model` — the
    pretrained weights when fine-tuning. They are kept in non-trainable variables and
    checkpointed with the run, so a resumed run keeps the original anchor.

    Args:
      scale: a non-negative number.
      **selection: `include`, `exclude` (by default variables with ndim ≥ 2: a new head's
        biases have no meaningful starting point either, so exclude new layers by path),
        `name`; see `Penalty`.
    """

    scale = Strength()

    def __init__(self, scale: float = 1e-3, **selection: Any):
        super().__init__(**selection)
        self.scale = scale
        self._anchors: list[tf.Variable] = []

    def default_selection(self, variable: Any) -> bool:
        return len(variable.shape) >= 2

    def build(self, variables: Sequence[Any]) -> None:
        super().build(variables)
        if not self._anchors:
            self._anchors = [
                tf.Variable(tf.cast(v, tf.float32), trainable=False, name="anchor")
                for v in variables
            ]

    def loss(self, variables: Sequence[Any]) -> tf.Tensor:
        if not variables:
            return tf.constant(0.0)
        terms = [
            tf.reduce_sum(tf.square(tf.cast(v, tf.float32) - anchor))
            for v, anchor in zip(variables, self._anchors, strict=True)
        ]
        return self.scale * tf.add_n(terms)

    def state_variables(self) -> list[tf.Variable]:
        return [*super().state_variables(), *self._anchors]
