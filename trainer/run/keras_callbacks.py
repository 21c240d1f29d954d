"""Keras callbacks in a run: `keras.callbacks.Callback`s called at the matching points."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import keras

from trainer.errors import ConfigError
from trainer.run.callbacks import Callback
from trainer.run.protocol import Runnable

if TYPE_CHECKING:
    from trainer.run.controller import TrainResult

# Keras callbacks that assign `model.optimizer.learning_rate`.
_SET_LEARNING_RATE = (keras.callbacks.LearningRateScheduler, keras.callbacks.ReduceLROnPlateau)


class KerasCallback(Callback):
    """Calls a `keras.callbacks.Callback` as `model.fit` would, with one evaluation interval
    as an epoch and one compiled loop as a batch (as `fit` does with `steps_per_execution`).

    - `set_model(model)` and `set_params({"epochs", "steps", "verbose"})`, then
      `on_train_begin`, when the run begins; `model.stop_training` is set to False.
    - `on_epoch_begin(epoch)` before the first loop of each evaluation interval: epoch `e`
      holds steps `e * eval_every + 1` to `(e + 1) * eval_every` (one epoch without
      `eval_every`), so a resumed run goes on counting.
    - `on_train_batch_begin(batch)` and `on_train_batch_end(batch, logs)` once per loop:
      `batch` is the index within the epoch of the loop's first, then last step; `logs` the
      loop's mean loss breakdown (`loss`, `data_loss`, ...). A loop whose loss is not finite
      is passed on too (`TerminateOnNaN` sees it) when no rollback undid it: the run then ends
      with the `FloatingPointError`.
    - `on_epoch_end(epoch, logs)` after each evaluation, with the model holding the evaluated
      weights (the EMA under `ema_decay`): `logs` are the last loop's figures plus the
      held-out metrics prefixed `val_`, as `fit` names them.
    - `on_train_end(logs)` at the end of a run that was not interrupted, with the last
      epoch's logs.

    `model.stop_training = True` set by the callback stops the run at that boundary: it is
    evaluated and saved, and ends with `stopped_early`, as with `early_stop_patience`.

    Args:
      callback: the Keras callback.
      trainer: the trainer whose model the callback is given.
    """

    def __init__(self, callback: keras.callbacks.Callback, trainer: Runnable):
        self.callback, self.trainer = callback, trainer
        self._epoch: int | None = None
        self._train_logs: dict[str, float] = {}
        self._logs: dict[str, float] = {}
        self._stopped = False

    def __repr__(self) -> str:
        return f"KerasCallback({type(self.callback).__name__})"

    def _call(self, method: Callable[..., Any], *args: Any) -> None:
        """Calls `method`, noting whether it asked the model to stop training."""
        model = self.trainer.model
        before = model.stop_training
        method(*args)
        self._stopped = self._stopped or (model.stop_training and not before)

    def _epoch_of(self, step: int) -> int:
        """The epoch of the step after `step`."""
        every = self.trainer.options.eval_every
        return step // every if every else 0

    def _batch(self, step: int) -> int:
        """The index within its epoch of the step after `step`."""
        return step - self._epoch * self.trainer.options.eval_every

    def on_train_begin(self, result: TrainResult) -> None:
        opts = self.trainer.options
        model = self.trainer.model
        self.callback.set_model(model)
        every = opts.eval_every or opts.train_steps
        epochs = math.ceil(opts.train_steps / every) if every else 0
        self.callback.set_params({"epochs": epochs, "steps": every, "verbose": 1})
        model.stop_training = False
        self._epoch, self._stopped = None, False
        self._train_logs, self._logs = dict(result.train), {}
        self._call(self.callback.on_train_begin, {})

    def on_loop_begin(self, step: int) -> None:
        epoch = self._epoch_of(step)
        if epoch != self._epoch:  # a new interval, or another one after a rollback
            self._epoch = epoch
            self._call(self.callback.on_epoch_begin, epoch, {})
        self._call(self.callback.on_train_batch_begin, self._batch(step), {})

    def on_loop_end(self, step: int, logs: dict[str, float]) -> None:
        self._train_logs = logs
        self._call(self.callback.on_train_batch_end, self._batch(step - 1), dict(logs))

    def on_nonfinite(self, step: int, logs: dict[str, float], error: FloatingPointError) -> bool:
        """Passes the loop on (the run ends with `error`); handles nothing."""
        self.on_loop_end(step, logs)
        return False

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        self._logs = {**self._train_logs, **{f"val_{k}": v for k, v in metrics.items()}}
        with self.trainer.evaluated_weights():  # what val_ measured, for ModelCheckpoint
            self._call(self.callback.on_epoch_end, self._epoch, dict(self._logs))
        self._epoch = None

    def on_train_end(self, result: TrainResult) -> None:
        self._call(self.callback.on_train_end, dict(self._logs or self._train_logs))

    def stop_reason(self) -> str | None:
        if not self._stopped:
            return None
        return f"{type(self.callback).__name__} set model.stop_training"


def check_callbacks(callbacks: Sequence[Any]) -> list[Any]:
    """`Trainer(callbacks=...)` checked: each a `Callback` or a `keras.callbacks.Callback`.

    Raises:
      ConfigError: another object; `keras.callbacks.EarlyStopping` with
        `restore_best_weights=True`, which would change the weights after the last
        checkpoint and the export were written (`keep_best` keeps and exports the best); or
        a Keras callback that sets the learning rate through `model.optimizer`, which an
        uncompiled model has not.
    """
    for value in callbacks:
        if not isinstance(value, (Callback, keras.callbacks.Callback)):
            raise ConfigError(
                f"`callbacks` must hold trainer.run.callbacks.Callback or "
                f"keras.callbacks.Callback objects, got {value!r}."
            )
        if isinstance(value, _SET_LEARNING_RATE):
            raise ConfigError(
                f"`callbacks` holds keras.callbacks.{type(value).__name__}, which sets "
                "model.optimizer's learning rate; the model is not compiled here: use "
                "lr_schedule and warmup_steps, or override build_optimizer."
            )
        if isinstance(value, keras.callbacks.EarlyStopping) and value.restore_best_weights:
            raise ConfigError(
                "`callbacks` holds keras.callbacks.EarlyStopping(restore_best_weights=True): "
                "use restore_best_weights=False with keep_best=True, which saves the best "
                "weights in model_dir/best/ and exports them."
            )
    return list(callbacks)


def as_callbacks(callbacks: Sequence[Any], trainer: Runnable) -> list[Callback]:
    """`callbacks` with each Keras one wrapped in a `KerasCallback`."""
    return [
        c if isinstance(c, Callback) else KerasCallback(c, trainer)
        for c in check_callbacks(callbacks)
    ]
