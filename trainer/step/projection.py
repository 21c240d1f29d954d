"""Penalties' projections after the optimizer's update: once per step, skipped with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from trainer.optimizers import is_loss_scaled
from trainer.penalties.base import Penalty


class Projections:
    """Runs penalties' `project` once per optimizer step, right after `apply_gradients`.

    As `updates.DecoupledUpdates`: the projections run in cross-replica context
    (`merge_call`), so mirrored variables get one identical update whatever the number of
    replicas; under a `LossScaleOptimizer` they are skipped on the steps it skips, told by
    its `iterations` not moving. They come before the EMA, which averages projected weights.
    Without projecting penalties the stage adds no op.

    Args:
      projections: `(penalty, selected variables)` pairs of penalties with `has_project`.
      optimizer: the optimizer whose skipped steps are skipped.
    """

    def __init__(self, projections: Sequence[tuple[Penalty, list[Any]]], optimizer: Any):
        self.projections = list(projections)
        self.optimizer = optimizer
        self.loss_scaled = is_loss_scaled(optimizer)

    @property
    def needs_iterations(self) -> bool:
        """Whether `__call__` needs `optimizer.iterations` read before `apply_gradients`."""
        return bool(self.projections) and self.loss_scaled

    def __call__(self, iterations_before: tf.Tensor | None) -> None:
        """Projects every selected variable, after `apply_gradients`.

        Args:
          iterations_before: `optimizer.iterations` read before `apply_gradients` when
            `needs_iterations`, else None.
        """
        if not self.projections:
            return
        applied = None
        if self.loss_scaled:
            # Every replica sees the same skip: the optimizer decides from all-reduced gradients.
            applied = tf.not_equal(tf.identity(self.optimizer.iterations.value), iterations_before)
        tf.distribute.get_replica_context().merge_call(self._merged, args=(applied,))

    def _merged(self, strategy: tf.distribute.Strategy, applied: Any) -> None:
        def project() -> tf.Tensor:
            for penalty, variables in self.projections:
                penalty.project(variables)
            return tf.constant(True)

        if applied is None:
            project()
        else:
            applied = strategy.experimental_local_results(applied)[0]
            tf.cond(applied, project, lambda: tf.constant(False))
