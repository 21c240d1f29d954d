"""Stage 0, before the loss: the value in force of each scheduled penalty strength."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow as tf

from trainer.penalties.base import Penalty
from trainer.step.stage import Stage, StepState


class StrengthSchedules(Stage):
    """Writes each scheduled strength's value for this step into its variable, first.

    The value is `base · m(step)` (`Penalty.scheduled_value`), `step` the optimizer's
    `iterations` before its update (0 at the first), so a resumed run continues its curve;
    `loss()`, `update()` and `project()` then read the variable as for a constant strength,
    and a sweep, which assigns the base variable, changes no traced op. The assignment runs
    once per step in cross-replica context, as `PenaltyUpdates`. The stage is on only when a
    penalty has a schedule.

    TensorBoard: `strength/<penalty>.<strength>` at step n is the value the next update uses
    (the schedule at `iterations` = n), as `learning_rate` is; the loop computes its other
    per-step values (`decay/<name>`) within `next_step`, so that they agree.

    Args:
      penalties: the penalties with a schedule.
      optimizer: the optimizer, whose `iterations` is the step.
      train_steps: a schedule's `steps` where it gives none.
    """

    phase = "gradients"

    def __init__(self, penalties: Sequence[Penalty], optimizer: Any, train_steps: int):
        self.scheduled = [(p, name) for p in penalties for name in p.schedules]
        self.optimizer = optimizer
        self.train_steps = train_steps

    def describe(self) -> str:
        return (
            "schedules ("
            + ", ".join(
                f"{p.name}.{name}: {p.schedules[name].spec()}" for p, name in self.scheduled
            )
            + ")"
        )

    def _values(self) -> list[tf.Tensor]:
        step = tf.identity(self.optimizer.iterations.value)
        return [p.scheduled_value(name, step, self.train_steps) for p, name in self.scheduled]

    def __call__(self, state: StepState) -> None:
        del state  # reads no gradients: it sets what the loss terms read
        tf.distribute.get_replica_context().merge_call(self._merged)

    def _merged(self, strategy: tf.distribute.Strategy) -> None:
        del strategy
        for (penalty, name), value in zip(self.scheduled, self._values(), strict=True):
            penalty.strength(name).assign(value)

    @contextlib.contextmanager
    def next_step(self) -> Iterator[None]:
        """Within it, while tracing, scheduled strengths read as at the optimizer's current
        `iterations` (the next update's values; see `Penalty.scheduled_at`)."""
        step = tf.identity(self.optimizer.iterations.value)
        with contextlib.ExitStack() as stack:
            for penalty in dict.fromkeys(p for p, _ in self.scheduled):
                stack.enter_context(penalty.scheduled_at(step, self.train_steps))
            yield

    def summary_tags(self) -> list[str]:
        return [f"strength/{p.name}.{name}" for p, name in self.scheduled]

    def summary_values(self) -> list[tf.Tensor]:
        return self._values()
