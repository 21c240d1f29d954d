"""Stage 5, after the update: an exponential moving average (EMA) of the weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf

from trainer.optimizers import is_loss_scaled
from trainer.step.stage import Stage, StepState


class ExponentialAverage(Stage):
    """`ema = m·ema + (1−m)·w` after every optimizer step (Keras' `use_ema` formula).

    m is `decay`, except 0 at the first step; on a step a `LossScaleOptimizer` skipped, m = 1
    (unchanged). Evaluation, export and the best checkpoint use the average (`evaluated`),
    while training continues on the raw weights. The averages are checkpointed, keyed by
    their weight's path.

    Args:
      decay: m, from 0 (excluded) to below 1.
      optimizer: the optimizer, whose `iterations` tell the first and skipped steps.
      variables: the trainable variables to average.
    """

    phase = "after_update"

    def __init__(
        self, decay: float, optimizer: keras.optimizers.Optimizer, variables: Sequence[Any]
    ):
        self.decay = decay
        self.optimizer = optimizer
        self.variables = list(variables)
        self.loss_scaled = is_loss_scaled(optimizer)
        # Written from the first replica: every replica holds the same values.
        first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.averages = {
            v.path: tf.Variable(v.numpy(), trainable=False, name="ema", aggregation=first)
            for v in self.variables
        }

    def describe(self) -> str:
        return f"ema_decay={self.decay:g} (evaluation and export use the EMA)"

    def __call__(self, state: StepState) -> None:
        before = state.iterations_before
        momentum = self.decay * tf.cast(tf.not_equal(before, 0), tf.float32)
        if self.loss_scaled:
            applied = state.applied(self.optimizer)
            momentum = applied * momentum + (1.0 - applied)
        for variable in self.variables:
            average = self.averages[variable.path]
            m = tf.cast(momentum, average.dtype)
            average.assign(m * average + (1 - m) * tf.cast(variable.value, average.dtype))

    def checkpoint_objects(self) -> dict[str, Any]:
        return {"ema_variables": dict(self.averages)}

    def state_variables(self) -> list[tf.Variable]:
        return list(self.averages.values())

    @contextlib.contextmanager
    def evaluated(self) -> Iterator[None]:
        """Within it, the trainable weights are the EMA (once a step has run); the raw
        weights are put back after, bit for bit."""
        if int(self.optimizer.iterations.numpy()) == 0:
            yield
            return
        raw = [v.numpy() for v in self.variables]
        for variable in self.variables:
            variable.assign(self.averages[variable.path].read_value())
        try:
            yield
        finally:
            for variable, value in zip(self.variables, raw, strict=True):
                variable.assign(value)
