"""Stage 2, a gradient transform: clipping the global norm of the whole gradient."""

from __future__ import annotations

import keras
import tensorflow as tf

from trainer.numerics import square_sum
from trainer.optimizers import is_loss_scaled
from trainer.step.stage import Stage, StepState


class Clipping(Stage):
    """Gradients scaled so that their global norm is at most `clip_norm`, as Keras'
    `global_clipnorm`.

    The norm is taken over all replicas' gradients (all-reduced) and unscaled by a loss
    scale; a non-finite norm makes every gradient NaN (the step is then skipped or the loop
    stops). The norm before clipping is kept in `grad_norm` for TensorBoard.

    Args:
      clip_norm: the largest global norm, > 0.
      optimizer: the optimizer (its loss scale, if any).
    """

    phase = "gradients"

    def __init__(self, clip_norm: float, optimizer: keras.optimizers.Optimizer):
        self.clip_norm = clip_norm
        self.optimizer = optimizer
        self.loss_scaled = is_loss_scaled(optimizer)
        first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.grad_norm = tf.Variable(0.0, trainable=False, name="grad_norm", aggregation=first)

    def describe(self) -> str:
        return f"clip_global_norm={self.clip_norm:g}"

    def __call__(self, state: StepState) -> None:
        gradients = state.gradients
        present = [g for g in gradients if g is not None]
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            present = replica.all_reduce(tf.distribute.ReduceOp.SUM, present)
        # Σg² as L2's Σw² (`square_sum`): XLA:CPU runs tf.linalg.global_norm's reductions
        # as scalar loops.
        norm = tf.sqrt(tf.add_n([square_sum(tf.cast(g, tf.float32)) for g in present]))
        if self.loss_scaled:
            norm = norm / tf.cast(self.optimizer.dynamic_scale, norm.dtype)
        self.grad_norm.assign(norm)
        clip = self.clip_norm
        scale = clip * tf.minimum(1.0 / norm, 1.0 / clip) + (norm - norm)  # NaN stays NaN
        state.gradients = [None if g is None else g * tf.cast(scale, g.dtype) for g in gradients]

    def summary_tags(self) -> list[str]:
        return ["grad_norm"]

    def summary_values(self) -> list[tf.Tensor]:
        return [self.grad_norm.read_value()]
