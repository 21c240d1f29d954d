"""Runs that manage themselves: the best evaluation and early stopping, rollback, profiling."""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf
from absl import logging

from trainer.errors import ConfigError
from trainer.optimizers import learning_rate_variable
from trainer.options import profile_range
from trainer.run import files


class Watch:
    """The task's held-out metric (`Trainer.sweep_metric`) over the evaluations of a run.

    Tracks the best evaluation (strictly better than every one before) and the evaluations
    in a row without an improvement of more than `early_stop_min_delta` over that best. Its
    state (`variables`) is saved in the run's checkpoints, so a resumed run keeps counting;
    with `keep_best` the best weights are saved to `<model_dir>/best/` with a `best.json`.

    Args:
      trainer: the `Trainer`, with its `options`.
      model_dir: the run's directory, or None.
    """

    def __init__(self, trainer: Any, model_dir: str | None):
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

    def restore(self, path: str, history: list[dict[str, Any]]) -> None:
        """The state saved in checkpoint `path` (none in one older than this: kept as new)."""
        tf.train.Checkpoint(runs=self.variables).restore(path).expect_partial()
        step = int(self.variables["best_step"].numpy())
        if step < 0:
            return
        saved = files.read_json(files.join(self.best_dir, "best.json")) if self.best_dir else None
        found = [h for h in history if h.get("step") == step]
        if isinstance(saved, dict) and saved.get("step") == step:
            self.best = saved
        else:
            value = float(self.variables["best_value"].numpy())
            self.best = found[-1] if found else {"step": step, self.name: value}

    @property
    def exhausted(self) -> bool:
        """Whether the patience has run out (a resumed run that stopped early stays stopped)."""
        return bool(self.patience) and int(self.variables["wait"].numpy()) >= self.patience

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Counts the evaluation at `step`; returns whether the run should stop early.

        Raises:
          ConfigError: early stopping or keep_best is on and `metrics` lacks the metric.
        """
        value = metrics.get(self.name)
        if value is None:
            if self.patience or self.best_dir:
                raise ConfigError(
                    f"The held-out metric {self.name!r} (Trainer.sweep_metric) is not among the "
                    f"evaluation's metrics ({', '.join(metrics) or 'none'})."
                )
            return False
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
        return self.exhausted

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
            model.export(export_dir, verbose=False)
        finally:
            for variable, value in zip(model.variables, raw, strict=True):
                variable.assign(value)
        logging.info("Exported the best weights (%s) to %s.", latest, export_dir)
        return True


class Rollback:
    """`on_nonfinite=rollback`: back to the last checkpoint (or the initial state), with the
    learning rate times `rollback_lr_factor`, at most `max_rollbacks` times.

    Args:
      trainer: the `Trainer`, built.
      checkpointer: the run's `Checkpointer`, or None.
    """

    def __init__(self, trainer: Any, checkpointer: Any | None):
        opts = trainer.options
        self.trainer, self.checkpointer = trainer, checkpointer
        self.left = opts.max_rollbacks if opts.on_nonfinite == "rollback" else 0
        self.factor = opts.rollback_lr_factor
        self.count = 0
        self._initial = trainer.get_state() if self.left else None

    def __call__(self, error: Exception) -> bool:
        """Rolls back after `error` (a non-finite loss) if any rollback is left; logs one line."""
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


class Profile:
    """`profile_steps='A,B'`: a TensorFlow profiler trace from step A to step B in
    `model_dir/plugins/profile/<run>/`; the controller cuts loops at A and B.

    Args:
      spec: the `profile_steps` option, or None (no trace).
      model_dir: the run's directory.
      train_steps: the run's last step.
    """

    def __init__(self, spec: str | None, model_dir: str | None, train_steps: int):
        self.range = profile_range(spec, train_steps) if spec and model_dir else None
        self.model_dir = model_dir
        self.active = False

    @property
    def cuts(self) -> tuple[int, ...]:
        """The steps loops end at for the trace."""
        return self.range or ()

    def before(self, step: int) -> None:
        """Starts the trace before the loop that begins at step A."""
        if self.range and step == self.range[0] and not self.active:
            tf.profiler.experimental.start(self.model_dir)
            self.active = True

    def after(self, step: int) -> None:
        """Stops the trace once step B is reached (or passed, after a rollback)."""
        if self.active and (step >= self.range[1] or step < self.range[0]):
            self.close()
            logging.info(
                "Profiled steps %d to %d in %s.",
                *self.range,
                files.join(self.model_dir, "plugins", "profile"),
            )
            self.range = None

    def close(self) -> None:
        """Stops a trace still running (the run ended or failed)."""
        if self.active:
            self.active = False
            tf.profiler.experimental.stop()
