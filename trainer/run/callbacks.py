"""Callbacks: one interface for what happens between two calls of the compiled loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import tensorflow as tf

from trainer.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the controller imports this module
    from trainer.run.controller import TrainResult


class Callback:
    """Reacts to a run between two calls of the compiled loop; override any method.

    The controller (`controller.Controller`) calls the run's callbacks in one written order:
    its own (profiling, progress, summaries, the lock, the best evaluation and early
    stopping, rollback), then the task's hooks (`hooks.Hooks`), then
    `Trainer(callbacks=[...])` in the order given. They run in Python on every worker, with
    values reduced over replicas, so decisions taken from those values agree (ones taken
    from anything else, a clock or a file, may differ between the workers of a multi-worker
    run, which must stop together); a method that raises ends the run as the exception.
    """

    def on_train_begin(self, result: TrainResult) -> None:
        """Once before the first loop, after a resume restored the run (this callback's
        `checkpoint_state` included): `result.step` is the step the run starts from and
        `result.history` the resumed run's evaluations."""

    def on_loop_begin(self, step: int) -> None:
        """Before each loop, at the step it starts from."""

    def on_loop_end(self, step: int, logs: dict[str, float]) -> None:
        """After each loop whose losses are finite: the step reached and the loop's mean loss
        breakdown (`loss`, `data_loss`, `penalty/<name>`, ...)."""

    def on_nonfinite(self, step: int, logs: dict[str, float], error: FloatingPointError) -> bool:
        """After a loop with a non-finite loss, instead of `on_loop_end`.

        Callbacks are asked in order until one returns True: it put the trainer back in a
        finite state, and training goes on from the trainer's step. When none does, the run
        ends with `error` (nothing non-finite is saved).

        Returns:
          Whether this callback handled it; False by default.
        """
        return False

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation during training (every `eval_every` steps, at the end, and
        where the run stops early): the held-out metrics, empty when the task has none."""

    def on_train_end(self, result: TrainResult) -> None:
        """Once, after the last checkpoint, the export and `results.json` are written; not when
        the run ends by an exception (a non-finite loss, `Preempted`)."""

    def stop_reason(self) -> str | None:
        """None to go on, or why the run should stop at this boundary.

        Asked after every loop's `on_loop_end`, after `on_evaluate`, and before the first loop
        (a resumed run that had stopped stays stopped). A run asked to stop evaluates (unless
        it just did), saves and ends as at `train_steps`, with `stopped_early` set; the reason
        is logged.
        """
        return None

    @property
    def loop_cuts(self) -> Sequence[int]:
        """Steps a loop must end at, so that this callback runs there (a profile's range)."""
        return ()

    @property
    def checkpoint_key(self) -> str:
        """The name `checkpoint_state` is saved under in the run's checkpoints; by default the
        class's name. Two callbacks with state need two names."""
        return type(self).__name__

    def checkpoint_state(self) -> dict[str, tf.Variable]:
        """Variables saved in the run's checkpoints and restored from them on resume, before
        `on_train_begin` (a checkpoint without them leaves them as they are); none by default.
        """
        return {}


class CallbackList:
    """A run's callbacks, called in their order.

    Args:
      callbacks: the callbacks, in the order they are called.
    """

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)

    def on_train_begin(self, result: TrainResult) -> None:
        for callback in self.callbacks:
            callback.on_train_begin(result)

    def on_loop_begin(self, step: int) -> None:
        for callback in self.callbacks:
            callback.on_loop_begin(step)

    def on_loop_end(self, step: int, logs: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_loop_end(step, dict(logs))  # a copy each: one cannot change another's

    def on_nonfinite(self, step: int, logs: dict[str, float], error: FloatingPointError) -> bool:
        """Whether a callback handled the non-finite loss; those after it are not asked."""
        return any(c.on_nonfinite(step, dict(logs), error) for c in self.callbacks)

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_evaluate(step, dict(metrics))

    def on_train_end(self, result: TrainResult) -> None:
        for callback in self.callbacks:
            callback.on_train_end(result)

    def stop_reason(self) -> str | None:
        """The first callback's reason to stop, or None when none asks."""
        reasons = (c.stop_reason() for c in self.callbacks)
        return next((r for r in reasons if r is not None), None)

    def loop_cuts(self) -> list[int]:
        """Every callback's cuts, sorted."""
        return sorted({cut for c in self.callbacks for cut in c.loop_cuts})

    def checkpoint_states(self) -> dict[str, dict[str, tf.Variable]]:
        """Each callback's checkpoint state by its `checkpoint_key`, for those that have one.

        Raises:
          ConfigError: two callbacks with state have the same `checkpoint_key`.
        """
        states: dict[str, dict[str, tf.Variable]] = {}
        for callback in self.callbacks:
            state = callback.checkpoint_state()
            if not state:
                continue
            key = callback.checkpoint_key
            if key in states:
                raise ConfigError(
                    f"Two callbacks save their state under `checkpoint_key` {key!r}; give one "
                    "of them another."
                )
            states[key] = state
        return states
