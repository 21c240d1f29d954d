"""`profile_steps='A,B'`: a TensorFlow profiler trace of steps A to B; a callback."""

from __future__ import annotations

from typing import TYPE_CHECKING

import tensorflow as tf
from absl import logging

from trainer.options import profile_range
from trainer.run import files
from trainer.run.callbacks import Callback

if TYPE_CHECKING:  # annotations only: the controller imports this module
    from trainer.run.controller import TrainResult


class Profile(Callback):
    """`profile_steps='A,B'`: a TensorFlow profiler trace from step A to step B in
    `model_dir/plugins/profile/<run>/`; loops are cut at A and B (`loop_cuts`).

    A run resumed past A traces what is left, from the step it starts from to B, and says
    so; one resumed at or past B writes no trace and warns (rerunning the same command
    resumes, so the range is not refused).

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

    def on_train_begin(self, result: TrainResult) -> None:
        """Narrows the range to what is left after the step the run starts from."""
        if not self.range or result.step <= self.range[0]:
            return
        first, last = self.range
        if result.step >= last:
            logging.warning(
                "profile_steps %d,%d: no trace is written, the run starts from step %d, past "
                "the range; give a range after it to profile this run.",
                first,
                last,
                result.step,
            )
            self.range = None
        else:
            logging.warning(
                "profile_steps %d,%d: the run starts from step %d, inside the range; tracing "
                "steps %d to %d only.",
                first,
                last,
                result.step,
                result.step,
                last,
            )
            self.range = (result.step, last)

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
