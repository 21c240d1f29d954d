"""Hooks a task overrides to react to a run: after each loop, each evaluation, and at the end."""

from __future__ import annotations

from typing import Any


class Hooks:
    """No-op hooks that `Controller` calls; `Trainer` has them, a task overrides any.

    They run in Python between two calls of the compiled loop, on every worker, with the
    values every replica agrees on (reduced over replicas); they cost nothing when not
    overridden. A hook that raises ends the run as the exception.
    """

    def on_loop_end(self, step: int, logs: dict[str, float]) -> None:
        """After each train loop: the step reached and the loop's mean loss breakdown."""

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation during `train()`: the step and the held-out metrics."""

    def on_train_end(self, result: Any) -> None:
        """Once, with the `TrainResult`, after the export and `results.json` are written."""
