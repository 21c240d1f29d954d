"""`on_nonfinite=rollback`: back to a finite state with a lower learning rate; a callback."""

from __future__ import annotations

from typing import TYPE_CHECKING

import tensorflow as tf
from absl import logging

from trainer.optimizers import learning_rate_variable
from trainer.run.callbacks import Callback
from trainer.run.checkpointing import Checkpointer
from trainer.run.protocol import Runnable

if TYPE_CHECKING:
    from trainer.run.controller import TrainResult


class Rollback(Callback):
    """`on_nonfinite=rollback`: back to the last checkpoint (or the state the run started
    from), with the learning rate times `rollback_lr_factor`, at most `max_rollbacks` times.

    Args:
      trainer: the trainer, built.
      checkpointer: the run's `Checkpointer`, or None.
    """

    def __init__(self, trainer: Runnable, checkpointer: Checkpointer | None):
        opts = trainer.options
        self.trainer, self.checkpointer = trainer, checkpointer
        self.left = opts.max_rollbacks if opts.on_nonfinite == "rollback" else 0
        self.factor = opts.rollback_lr_factor
        self.count = 0
        self._initial = None

    def on_train_begin(self, result: TrainResult) -> None:
        """Keeps the state the run starts from (after a resume's restore), to return to when
        there is no checkpoint."""
        self._initial = self.trainer.get_state() if self.left else None

    def on_nonfinite(self, step: int, logs: dict[str, float], error: FloatingPointError) -> bool:
        """Rolls back after `error` if any rollback is left; logs one line."""
        if not self.left:
            return False
        self.left -= 1
        self.count += 1
        rate = learning_rate_variable(self.trainer.optimizer)
        before = float(rate.numpy()) if rate is not None else None
        path = (
            tf.train.latest_checkpoint(self.checkpointer.directory) if self.checkpointer else None
        )
        if path:
            self.checkpointer.restore(path)
        else:
            self.trainer.set_state(self._initial)
        if rate is not None:
            rate.assign(before * self.factor)
            lr = f"learning rate {before:.6g} -> {before * self.factor:.6g}"
        else:
            lr = "learning-rate schedule unchanged"
        logging.warning(
            "Rollback %d: %s Back to %s (step %d); %s; %d rollback(s) left.",
            self.count,
            str(error).split(";")[0] + ".",
            path or "the initial state",
            self.trainer.step,
            lr,
            self.left,
        )
        return True
