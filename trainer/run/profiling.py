"""`profile_steps='A,B'`: a TensorFlow profiler trace of steps A to B; a callback."""

from __future__ import annotations

import tensorflow as tf
from absl import logging

from trainer.options import profile_range
from trainer.run import files
from trainer.run.callbacks import Callback


class Profile(Callback):
    """`profile_steps='A,B'`: a TensorFlow profiler trace from step A to step B in
    `model_dir/plugins/profile/<run>/`; loops are cut at A and B (`loop_cuts`).

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
    def loop_cuts(self) -> tuple[int, ...]:
        return self.range or ()

    def on_loop_begin(self, step: int) -> None:
        """Starts the trace before the loop that begins at step A."""
        if self.range and step == self.range[0] and not self.active:
            tf.profiler.experimental.start(self.model_dir)
            self.active = True

    def on_loop_end(self, step: int, logs: dict[str, float]) -> None:
        """Stops the trace once step B is reached (or passed, after a rollback)."""
        if self.active and (step >= self.range[1] or step < self.range[0]):
            self.close()
            logging.info(
                "Profiled steps %d to %d in %s.",
                *self.range,
                files.join(self.model_dir, "plugins", "profile"),
            )
            self.range = None

    def on_nonfinite(self, step: int, logs: dict[str, float], error: FloatingPointError) -> bool:
        """As after any loop: a rollback or the end of the run follows."""
        self.on_loop_end(step, logs)
        return False

    def close(self) -> None:
        """Stops a trace still running (the run ended or failed)."""
        if self.active:
            self.active = False
            tf.profiler.experimental.stop()
