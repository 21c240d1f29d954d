"""Stage 1, the loss terms and their gradients: one pass, or `accumulate_steps` micro-batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from trainer.errors import ConfigError
from trainer.numerics import upstream_after
from trainer.optimizers import is_loss_scaled
from trainer.step.stage import Stage, StepState


class Gradients(Stage):
    """The loss breakdown and the gradients of its total, for this replica's batch.

    With `accumulate_steps=k > 1` the batch is split into k micro-batches whose gradients
    are summed: each micro-batch's data loss is its share of the global mean (`/k`); loss
    penalties and Keras regularizer losses enter once, with the first micro-batch. Under a
    `LossScaleOptimizer` the loss is scaled before its gradients are taken.

    Every gradient is ordered after the penalty terms' values (`numerics.upstream_after`),
    so that no in-place update waits on a copy of a weight a term reads.

    Args:
      compute_losses: `(features, labels) -> [total, data loss, *terms]`, traced under the
        tape.
      optimizer: the optimizer (its loss scale, if any).
      variables: the trainable variables, in the gradients' order.
      accumulate_steps: micro-batches per optimizer step, ≥ 1.
      record: whether the step's own pass (each micro-batch, not SAM's second pass) asks
        `compute_losses` to update the training metrics (`record=True`).
    """

    phase = "gradients"

    def __init__(
        self,
        compute_losses: Callable[..., list[tf.Tensor]],
        optimizer: keras.optimizers.Optimizer,
        variables: Sequence[Any],
        accumulate_steps: int = 1,
        record: bool = False,
    ):
        self.compute_losses = compute_losses
        self.optimizer = optimizer
        self.variables = list(variables)
        self.accumulate_steps = accumulate_steps
        self.record = record
        self.loss_scaled = is_loss_scaled(optimizer)

    def describe(self) -> str:
        k = self.accumulate_steps
        return f"gradients (accumulate_steps={k})" if k > 1 else "gradients"

    def __call__(self, state: StepState) -> None:
        state.gradients, state.losses = self.compute(state.batch, self.record)

    def compute(self, batch: Any, record: bool = False) -> tuple[list[Any], list[tf.Tensor]]:
        """The gradients (loss-scaled, if so) and the loss breakdown of `batch` at the
        variables' current values; `SharpnessAware` calls it again at the perturbed weights
        (without `record`: those outputs are not the step's)."""
        recording = {"record": True} if record else {}
        if self.accumulate_steps > 1:
            return self._accumulate(batch, recording)
        with tf.GradientTape() as tape:
            losses = self.compute_losses(*batch, **recording)
            loss = self.optimizer.scale_loss(losses[0]) if self.loss_scaled else losses[0]
        return tape.gradient(loss, self.variables, upstream_after(losses[2:])), losses

    def _accumulate(
        self, batch: Any, recording: dict[str, bool]
    ) -> tuple[list[Any], list[tf.Tensor]]:
        """Gradients summed over the micro-batches, and the whole batch's loss breakdown."""
        k = self.accumulate_steps
        features, labels = batch
        size = tf.nest.flatten(labels)[0].shape[0]
        if size is not None and size % k:
            raise ConfigError(
                f"accumulate_steps ({k}) must divide each replica's batch ({size} examples)."
            )
        splits = [tf.split(t, k) for t in tf.nest.flatten((features, labels))]
        total_grads, data_sum = None, 0.0
        for i in range(k):
            f, l_ = tf.nest.pack_sequence_as((features, labels), [s[i] for s in splits])
            with tf.GradientTape() as tape:
                _, data, *terms = self.compute_losses(f, l_, **recording)
                loss = data / k
                if i == 0:
                    penalty = tf.nn.scale_regularization_loss(tf.add_n(terms)) if terms else 0.0
                    loss, first_terms = loss + penalty, terms
                if self.loss_scaled:
                    loss = self.optimizer.scale_loss(loss)
            grads = tape.gradient(loss, self.variables, upstream_after(terms) if i == 0 else None)
            total_grads = (
                grads
                if total_grads is None
                else [
                    a if b is None else b if a is None else a + b
                    for a, b in zip(total_grads, grads, strict=True)
                ]
            )
            data_sum += data
        data = data_sum / k
        return total_grads, [data + penalty, data, *first_terms]
