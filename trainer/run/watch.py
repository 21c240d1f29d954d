"""The best evaluation of a run, kept and exported, and early stopping: a callback."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import tensorflow as tf
from absl import logging

from trainer.errors import ConfigError
from trainer.run import files, records
from trainer.run.callbacks import Callback
from trainer.run.checkpointing import check_state_file
from trainer.run.export import export_saved_model
from trainer.run.protocol import Runnable
from trainer.run.records import NUMBER, Optional, Record

if TYPE_CHECKING:
    from trainer.run.controller import TrainResult

# `best.json`: the best evaluation's step and metrics (null where not finite).
BEST_SCHEMA = Record({"step": int}, required=("step",), rest=Optional(NUMBER))


class Watch(Callback):
    """The task's held-out metric (`Trainer.sweep_metric`) over the evaluations of a run.

    Tracks the best evaluation (strictly better than every one before) and the evaluations
    in a row without an improvement of more than `early_stop_min_delta` over that best; asks
    the run to stop when `early_stop_patience` of them ran out. Its state is saved in the
    run's checkpoints, so a resumed run keeps counting; with `keep_best` the best weights are
    saved to `<model_dir>/best/` with a `best.json`.

    Args:
      trainer: the trainer, with its `options`.
      model_dir: the run's directory, or None.
    """

    checkpoint_key = "watch"

    def __init__(self, trainer: Runnable, model_dir: str | None):
        opts = trainer.options
        self.trainer = trainer
        self.name, self.mode = trainer.sweep_metric
        self.patience, self.min_delta = opts.early_stop_patience, opts.early_stop_min_delta
        self.best_dir = files.join(model_dir, "best") if opts.keep_best and model_dir else None
        self.best: dict[str, float] | None = None
        self.variables = {
            "best_value": tf.Variable(math.nan, dtype=tf.float64, trainable=False),
            "best_step": tf.Variable(-1, dtype=tf.int64, trainable=False),
            "wait": tf.Variable(0, dtype=tf.int64, trainable=False),
        }
        self._manager = None

    def checkpoint_state(self) -> dict[str, tf.Variable]:
        return self.variables

    def on_train_begin(self, result: TrainResult) -> None:
        """The best evaluation of a resumed run: its `best.json`, else its entry in the
        history, else the step and value the checkpoint holds.

        Raises:
          ConfigError: `best/best.json` or `best/checkpoint` is damaged (left as it is).
        """
        saved = None
        if self.best_dir:
            check_state_file(self.best_dir, rebuild=self.trainer.is_chief)
            saved = records.read(files.join(self.best_dir, "best.json"), BEST_SCHEMA)
        step = int(self.variables["best_step"].numpy())
        if step < 0:
            return
        found = [h for h in result.history if h.get("step") == step]
        if saved is not None and saved["step"] == step:
            self.best = saved
        else:
            value = float(self.variables["best_value"].numpy())
            self.best = found[-1] if found else {"step": step, self.name: value}

    @property
    def exhausted(self) -> bool:
        """Whether the patience has run out (a resumed run that stopped early stays stopped)."""
        return bool(self.patience) and int(self.variables["wait"].numpy()) >= self.patience

    def stop_reason(self) -> str | None:
        if not self.exhausted:
            return None
        best = self.best or {}
        return (
            f"{self.patience} evaluations without an improvement of eval {self.name}; the best, "
            f"{best.get(self.name)}, at step {best.get('step')}"
        )

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """Counts the evaluation at `step`; keeps its weights if it is the best.

        Raises:
          ConfigError: early stopping or keep_best is on and `metrics` lacks the metric.
        """
        if not metrics:
            return
        value = metrics.get(self.name)
        if value is None:
            if self.patience or self.best_dir:
                raise ConfigError(
                    f"The held-out metric {self.name!r} (Trainer.sweep_metric) is not among the "
                    f"evaluation's metrics ({', '.join(metrics)})."
                )
            return
        sign = 1.0 if self.mode == "min" else -1.0
        v = self.variables
        best, first = float(v["best_value"].numpy()), int(v["best_step"].numpy()) < 0
        finite = math.isfinite(value)
        if finite and (first or sign * value < sign * best - self.min_delta):
            v["wait"].assign(0)
        else:
            v["wait"].assign_add(1)
        if finite and (first or sign * value < sign * best):
            v["best_value"].assign(value)
            v["best_step"].assign(step)
            self.best = {"step": step, **metrics}
            if self.best_dir and self.trainer.is_chief:
                self._save_best(step)

    def _checkpoint(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(model_variables=list(self.trainer.model.variables))

    def _save_best(self, step: int) -> None:
        if self._manager is None:
            self._manager = tf.train.CheckpointManager(self._checkpoint(), self.best_dir, 1)
        with self.trainer.evaluated_weights():  # what was evaluated: the EMA with ema_decay
            self._manager.save(checkpoint_number=step)
        files.write_json(files.join(self.best_dir, "best.json"), self.best)

    def export_best(self, export_dir: str) -> bool:
        """Exports the best weights to `export_dir`; False when none were kept. The model's
        weights are put back after."""
        latest = tf.train.latest_checkpoint(self.best_dir) if self.best_dir else None
        if latest is None:
            return False
        model = self.trainer.model
        raw = [v.numpy() for v in model.variables]
        self._checkpoint().restore(latest).expect_partial()
        try:
            export_saved_model(self.trainer, export_dir)
        finally:
            for variable, value in zip(model.variables, raw, strict=True):
                variable.assign(value)
        logging.info("Exported the best weights (%s) to %s.", latest, export_dir)
        return True
