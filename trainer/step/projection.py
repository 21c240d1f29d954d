"""Stage 5, after the update: penalties' projections (max_norm, unit_norm, non_neg, plugins)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from trainer.optimizers import is_loss_scaled
from trainer.penalties.base import Penalty
from trainer.step.stage import Stage, StepState


class Projections(Stage):
    """Runs penalties' `project()` once per optimizer step, after the optimizer's update.

    Like `PenaltyUpdates`, in cross-replica context (`merge_call`), so mirrored variables
    get one identical projection; skipped on a step a `LossScaleOptimizer` skipped, so that
    the weights stay bit for bit as they were.

    Args:
      projections: `(penalty, selected variables)` pairs of penalties with `has_project`.
      optimizer: the optimizer, whose `iterations` tell a skipped step.
    """

    phase = "after_update"

    def __init__(
        self,
        projections: Sequence[tuple[Penalty, list[Any]]],
        optimizer: keras.optimizers.Optimizer,
    ):
        self.projections = list(projections)
        self.optimizer = optimizer
        self.loss_scaled = is_loss_scaled(optimizer)

    def describe(self) -> str:
        return ", ".join(p.name for p, _ in self.projections)

    def __call__(self, state: StepState) -> None:
        applied = state.applied(self.optimizer) if self.loss_scaled else tf.constant(1.0)
        tf.distribute.get_replica_context().merge_call(self._merged, args=(applied,))

    def _merged(self, strategy: tf.distribute.Strategy, applied: Any) -> None:
        applied = strategy.experimental_local_results(applied)[0]

        def project() -> tf.Tensor:
            for penalty, variables in self.projections:
                penalty.project(variables)
            return tf.constant(True)

        if self.loss_scaled:
            tf.cond(applied > 0, project, lambda: tf.constant(False))
        else:
            project()
