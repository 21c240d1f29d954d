"""Stage 3, before the update: penalties' direct weight updates (decoupled weight decay)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from trainer.optimizers import initial_learning_rate, is_loss_scaled
from trainer.penalties.base import Penalty, StepContext
from trainer.step.stage import Stage, StepState


class PenaltyUpdates(Stage):
    """Runs penalties' `update()` once per optimizer step, before the optimizer's update.

    The updates run in cross-replica context (`merge_call`), so mirrored variables get one
    identical update whatever the number of replicas, at this step's learning rate (read
    before the optimizer moves it). Under a `LossScaleOptimizer` they are skipped on the
    steps it skips (non-finite gradients on any replica), as Keras' own weight decay is.

    Args:
      updates: `(penalty, selected variables)` pairs of penalties with `has_update`.
      optimizer: the optimizer whose learning rate couples the decay.
    """

    phase = "before_update"

    def __init__(self, updates: Sequence[tuple[Penalty, list[Any]]], optimizer: Any):
        self.updates = list(updates)
        self.optimizer = optimizer
        self.loss_scaled = is_loss_scaled(optimizer)
        self.initial_learning_rate = initial_learning_rate(optimizer)

    def describe(self) -> str:
        return ", ".join(p.name for p, _ in self.updates)

    def __call__(self, state: StepState) -> None:
        """Applies every update; the gradients tell whether the optimizer will skip the step."""
        gradients = state.gradients
        lr = tf.cast(self.optimizer.learning_rate, tf.float32)
        replica = tf.distribute.get_replica_context()
        nonfinite = tf.constant(0.0)  # replicas whose gradients are not finite
        if self.loss_scaled:
            local = tf.reduce_all(
                [tf.reduce_all(tf.math.is_finite(g)) for g in gradients if g is not None]
            )
            local = tf.cast(tf.logical_not(local), tf.float32)
            nonfinite = replica.all_reduce(tf.distribute.ReduceOp.SUM, local)
        replica.merge_call(self._merged, args=(lr, nonfinite))

    def _merged(self, strategy: tf.distribute.Strategy, lr: Any, nonfinite: Any) -> None:
        lr = strategy.experimental_local_results(lr)[0]
        nonfinite = strategy.experimental_local_results(nonfinite)[0]
        context = StepContext(lr, lr / self.initial_learning_rate)

        def update() -> tf.Tensor:
            for penalty, variables in self.updates:
                penalty.update(variables, context)
            return tf.constant(True)

        if self.loss_scaled:
            tf.cond(nonfinite == 0, update, lambda: tf.constant(False))
        else:
            update()
