"""Hooks a task overrides to react to a run, and the callback that calls them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer.run.callbacks import Callback

if TYPE_CHECKING:
    from trainer.run.controller import TrainResult


class Hooks:
    """No-op hooks that the controller calls; `Trainer` has them, a task overrides any.

    They run in Python between two calls of the compiled loop, on every worker, with the
    values every replica agrees on (reduced over replicas); they cost nothing when not
    overridden. A hook that raises ends the run as the exception. They are called through
    `TaskHooks`, after the controller's own callbacks and before `Trainer(callbacks=...)`.
    """

    def on_loop_end(self, step: int, logs: dict[str, float]) -> None:
        """After each train loop: the step reached and the loop's mean loss breakdown."""

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation during `train()`: the step and the held-out metrics."""

    def on_train_end(self, result: Any) -> None:
        """Once, with the `TrainResult`, after the export and `results.json` are written."""


class TaskHooks(Callback):
    """A task's `Hooks` as a callback: `on_evaluate` only with metrics (an eval dataset).

    Args:
      hooks: the trainer, whose hooks its task may override.
    """

    def __init__(self, hooks: Hooks):
        self.hooks = hooks

    def on_loop_end(self, step: int, logs: dict[str, float]) -> None:
        self.hooks.on_loop_end(step, logs)

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        if metrics:
            self.hooks.on_evaluate(step, metrics)

    def on_train_end(self, result: TrainResult) -> None:
        self.hooks.on_train_end(result)
