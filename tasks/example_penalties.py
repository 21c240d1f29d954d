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
      include: regex or predicate on `variable.path`.
      exclude: regex or predicate on `variable.path`.
    """

    scale = Strength()

    def __init__(self, scale: float = 1e-5, *, include=None, exclude=None):
        super().__init__(include=include, exclude=exclude)
        self.scale = scale

    def loss(self, variables: Sequence[Any]) -> tf.Tensor:
        terms = [tf.reduce_sum(tf.abs(tf.cast(v, tf.float32))) for v in variables]
        return self.strength("scale") * tf.add_n(terms or [tf.constant(0.0)])

    def params(self) -> dict[str, Any]:
        return {"scale": self.scale}


@register_penalty("l2sp")
class L2SP(Penalty):
    """L2 toward the starting point: `scale · Σ‖w − w₀‖²` (Li, Grandvalet & Davoine, 2018).

    `w₀` are the weights when the penalty is resolved, i.e. right after `build_model` — the
    pretrained weights when fine-tuning. They are kept in non-trainable variables and
    checkpointed with the run, so a resumed run keeps the original anchor.

    Args:
      scale: a non-negative number.
      include: regex or predicate; by default variables with ndim ≥ 2 (the new head's biases
        have no meaningful starting point either, so exclude new layers by path).
      exclude: regex or predicate.
    """

    scale = Strength()

    def __init__(self, scale: float = 1e-3, *, include=None, exclude=None):
        super().__init__(include=include, exclude=exclude)
        self.scale = scale
        self._anchors: list[tf.Variable] = []

    def default_selection(self, variable: Any) -> bool:
        return len(variable.shape) >= 2

    def select(self, variables: Sequence[Any]) -> list[Any]:
        chosen = super().select(variables)
        if not self._anchors:
            self._anchors = [
                tf.Variable(tf.cast(v, tf.float32), trainable=False, name="anchor") for v in chosen
            ]
        return chosen

    def loss(self, variables: Sequence[Any]) -> tf.Tensor:
        if not variables:
            return tf.constant(0.0)
        terms = [
            tf.reduce_sum(tf.square(tf.cast(v, tf.float32) - anchor))
            for v, anchor in zip(variables, self._anchors, strict=True)
        ]
        return self.strength("scale") * tf.add_n(terms)

    def state_variables(self) -> list[tf.Variable]:
        return [*super().state_variables(), *self._anchors]

    def params(self) -> dict[str, Any]:
        return {"scale": self.scale}
