"""A stage of the optimizer step (`Stage`) and the state that flows through the stages."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar

import keras
import tensorflow as tf

# The phases of one step, in order; every stage belongs to one.
PHASES = ("gradients", "before_update", "update", "after_update")


@dataclasses.dataclass
class StepState:
    """What flows through the stages of one optimizer step, on one replica, while tracing.

    Attributes:
      batch: this replica's `(features, labels)`, preprocessed.
      losses: the loss breakdown (total, data loss, each penalty term), set by `Gradients`.
      gradients: one per trainable variable (None where it has none), set by `Gradients`
        and transformed by the gradient stages.
      iterations_before: the optimizer's `iterations` read just before its update, when a
        stage after the update needs it (see `applied`); else None.
      snapshot: the parameter groups' variables before the pre-update phase, set by
        `groups.GroupSnapshot`; else None.
    """

    batch: Any
    losses: list[tf.Tensor] | None = None
    gradients: list[Any] | None = None
    iterations_before: tf.Tensor | None = None
    snapshot: list[tf.Tensor] | None = None

    def applied(self, optimizer: keras.optimizers.Optimizer) -> tf.Tensor:
        """Whether the optimizer applied this step (a `LossScaleOptimizer` skips steps with
        non-finite gradients, leaving `iterations` unchanged): a float32 1.0 or 0.0."""
        now = tf.identity(optimizer.iterations.value)
        return tf.cast(tf.not_equal(now, self.iterations_before), tf.float32)


class Stage:
    """One stage of the optimizer step: what it adds to the compiled step, its state, its
    `describe()` line.

    A subclass sets `phase` (one of `PHASES`) and implements `__call__`, which reads and
    writes the `StepState` while the step is traced. State (variables) it creates belongs
    under the strategy's scope: the Trainer builds the chain there.
    """

    phase: ClassVar[str] = ""

    def __call__(self, state: StepState) -> None:
        """Adds this stage's ops to the step; reads and updates `state`."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short description for the start-up table; "" to show nothing."""
        return ""

    def checkpoint_objects(self) -> dict[str, Any]:
        """Trackable state saved with the run's checkpoints, by key."""
        return {}

    def state_variables(self) -> list[tf.Variable]:
        """Variables `Trainer.get_state`/`set_state` carry (a rollback restores them)."""
        return []

    def summary_tags(self) -> list[str]:
        """Extra per-step TensorBoard tags, in the order of `summary_values`."""
        return []

    def summary_values(self) -> list[tf.Tensor]:
        """The values for `summary_tags`, read inside the train loop."""
        return []

    def evaluated(self) -> contextlib.AbstractContextManager:
        """A context within which the model holds the weights to evaluate and export (the
        EMA's, say); by default the trained weights, unchanged."""
        return contextlib.nullcontext()
