"""Stage 4, the update: the optimizer applies the gradients (and the model's Keras constraints)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from trainer.step.stage import Stage, StepState


class OptimizerUpdate(Stage):
    """`optimizer.apply_gradients` on the trainable variables.

    Keras applies each variable's `constraint` (a layer's `kernel_constraint=...`) right
    after its update, inside `apply_gradients`, as in `fit`; a `LossScaleOptimizer` skips
    the whole update on non-finite gradients.

    Args:
      optimizer: the optimizer.
      variables: the trainable variables, in the gradients' order.
      record_iterations: read `iterations` before the update into the `StepState`, for the
        stages after it that must know whether the step was applied.
    """

    phase = "update"

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer,
        variables: Sequence[Any],
        *,
        record_iterations: bool = False,
    ):
        self.optimizer = optimizer
        self.variables = list(variables)
        self.record_iterations = record_iterations

    def describe(self) -> str:
        return "apply_gradients"

    def __call__(self, state: StepState) -> None:
        if self.record_iterations:
            state.iterations_before = tf.identity(self.optimizer.iterations.value)
        self.optimizer.apply_gradients(zip(state.gradients, self.variables, strict=True))
