"""TensorBoard: scalars written inside the multi-step tf.function, eval metrics, texts, HParams."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from trainer.penalties.base import Penalty, StepContext
from trainer.run.callbacks import Callback

if TYPE_CHECKING:
    from trainer.run.protocol import Loop


def loss_tag(name: str) -> str:
    """`loss` -> `loss/total`, `data_loss` -> `loss/data`, `penalty/l2` -> `loss/penalty/l2`."""
    return {"loss": "loss/total", "data_loss": "loss/data"}.get(name, f"loss/{name}")


def step_tags(loss_names: Sequence[str], selections: Sequence[tuple[Penalty, Any]]) -> list[str]:
    """The per-step scalar tags, in the order of `step_values`.

    `loss/total`, `loss/data`, `loss/penalty/<name>`, `learning_rate`, `decay/<name>` (a
    decoupled penalty's multiplicative decay this step) and `norm/<name>` (the global L2 norm
    of a penalty's selected variables).
    """
    tags = [loss_tag(name) for name in loss_names] + ["learning_rate"]
    tags += [f"decay/{p.name}" for p, _ in selections if _decay_fn(p)]
    return tags + [f"norm/{p.name}" for p, _ in selections]


def _decay_fn(penalty: Penalty) -> Any:
    decay = getattr(penalty, "decay", None)
    return decay if penalty.has_update and callable(decay) else None


def step_values(
    losses: tf.Tensor,
    learning_rate: tf.Tensor,
    initial_learning_rate: tf.Tensor,
    selections: Sequence[tuple[Penalty, list[Any]]],
) -> tf.Tensor:
    """The values for `step_tags`, one float32 vector; XLA-compatible (nothing is written)."""
    context = StepContext(learning_rate, learning_rate / initial_learning_rate)
    decays = [_decay_fn(p)(context) for p, _ in selections if _decay_fn(p)]
    norms = [tf.linalg.global_norm([tf.cast(v, tf.float32) for v in vs]) for _, vs in selections]
    extra = tf.stack([learning_rate, *decays, *norms])
    return tf.concat([tf.cast(losses, tf.float32), tf.cast(extra, tf.float32)], axis=0)


def write_rows(tags: Sequence[str], rows: tf.Tensor, steps: tf.Tensor, count: tf.Tensor) -> None:
    """Writes `rows[i]` (values for `tags`) at `steps[i]` for i < count, to the default writer.

    Callable inside a `tf.function`; tags are written under an empty name scope, so that they
    carry no `while/` prefix from the loop.
    """
    for i in tf.range(count):
        with tf.compat.v1.name_scope(None):  # inside the loop: the loop opens its own scope
            for j, tag in enumerate(tags):
                tf.summary.scalar(tag, rows[i, j], step=steps[i])


def write_scalars(writer: tf.summary.SummaryWriter, step: int, values: dict[str, float]) -> None:
    """Eager scalars (steps/s, eval metrics) at `step`."""
    with writer.as_default(step=step):
        for tag, value in values.items():
            tf.summary.scalar(tag, value)


def write_text(writer: tf.summary.SummaryWriter, tag: str, text: str, step: int = 0) -> None:
    """`text` as a preformatted TensorBoard text summary (a markdown code block)."""
    with writer.as_default(step=step):
        tf.summary.text(tag, "```\n" + text + "\n```")


def write_hparams(writer: tf.summary.SummaryWriter, hparams: dict[str, Any], trial_id: str) -> None:
    """This run's hyperparameters for TensorBoard's HParams dashboard."""
    from tensorboard.plugins.hparams import api as hp

    with writer.as_default():
        hp.hparams(hparams, trial_id=trial_id)


class WriteScalars(Callback):
    """Writes `steps_per_sec` (and `train/<metric>`, the training metrics streamed over the
    loop, when on) after each loop and `eval/<metric>` after each evaluation to the loop's
    TensorBoard writer, when it has one (the per-step scalars are the loop's own).

    Args:
      loop: the compiled loop, whose `writer` is used.
      rate: the last loop's steps per second (measured by the controller).
    """

    def __init__(self, loop: Loop, rate: Callable[[], float]):
        self.loop, self.rate = loop, rate

    def on_loop_end(self, step: int, logs: dict[str, float]) -> None:
        if self.loop.writer is not None:
            streamed = {k: v for k, v in logs.items() if k.startswith("train/")}
            write_scalars(self.loop.writer, step, {"steps_per_sec": self.rate(), **streamed})

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        if self.loop.writer is not None and metrics:
            write_scalars(self.loop.writer, step, {f"eval/{k}": v for k, v in metrics.items()})
