"""Progress: one live line (step, steps/s, ETA, losses) on a terminal; log lines otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from absl import logging

from trainer.run.callbacks import Callback


def format_losses(logs: dict[str, float]) -> str:
    """`loss=0.1234 data_loss=0.12 penalty/l2=0.0034` for progress lines."""
    return " ".join(f"{k}={v:.4g}" for k, v in logs.items())


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Reports training progress.

    On a terminal, one line is rewritten in place; when the stream is not a terminal (CI,
    files, pipes) each update is a plain `absl.logging` line.

    Args:
      total_steps: the step training ends at, for the ETA.
      stream: where the live line goes; `sys.stderr` by default.
    """

    def __init__(self, total_steps: int, stream: TextIO | None = None):
        self.total_steps = total_steps
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._open = False

    def update(self, step: int, steps_per_sec: float, logs: dict[str, float]) -> str:
        """Shows `step`, the rate, the ETA at that rate and the loss breakdown; returns it."""
        eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else 0.0
        line = (
            f"step {step}/{self.total_steps}  {steps_per_sec:.1f} steps/s  "
            f"ETA {_duration(eta)}  {format_losses(logs)}"
        )
        if self.live:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
            self._open = True
        else:
            logging.info(line)
        return line

    def message(self, text: str) -> None:
        """A line that stays (eval results, notices), below the live line."""
        self.close()
        logging.info(text)

    def close(self) -> None:
        """Ends the live line, if one is showing."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


class ShowProgress(Callback):
    """Shows each loop's step, rate and losses, and each evaluation, on a `Progress`.

    Args:
      progress: where they are shown.
      rate: the last loop's steps per second (measured by the controller).
    """

    def __init__(self, progress: Progress, rate: Callable[[], float]):
        self.progress, self.rate = progress, rate

    def on_loop_end(self, step: int, logs: dict[str, float]) -> None:
        self.progress.update(step, self.rate(), logs)

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        if metrics:
            self.progress.message(f"eval at step {step}  {format_losses(metrics)}")
