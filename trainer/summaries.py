"""TensorBoard: scalars written inside the multi-step tf.function, eval metrics, texts, HParams."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from trainer.penalties import Penalty, StepContext


def loss_tag(name: str) -> str:
    """`loss` -> `loss/total`, `data_loss` -> `loss/data`, `penalty/l2` -> `loss/penalty/l2`."""
    return {"loss": "loss/total", "data_loss": "loss/data"}.get(name, f"loss/{name}")


def write_step_scalars(
    step: tf.Variable,
    loss_names: Sequence[str],
    losses: tf.Tensor,
    learning_rate: tf.Tensor,
    initial_learning_rate: tf.Tensor,
    selections: Sequence[tuple[Penalty, list[Any]]],
) -> None:
    """The per-step scalars, for the default writer; callable inside a `tf.function`.

    Tags: `loss/total`, `loss/data`, `loss/penalty/<name>`, `learning_rate`,
    `decay/<name>` (a decoupled penalty's multiplicative decay this step) and `norm/<name>`
    (the global L2 norm of a penalty's selected variables). Written under an empty name
    scope, so that tags carry no `while/` prefix from the loop.
    """
    with tf.compat.v1.name_scope(None):
        for i, name in enumerate(loss_names):
            tf.summary.scalar(loss_tag(name), losses[i], step=step)
        tf.summary.scalar("learning_rate", learning_rate, step=step)
        context = StepContext(learning_rate, learning_rate / initial_learning_rate)
        for penalty, variables in selections:
            decay = getattr(penalty, "decay", None)
            if penalty.has_update and callable(decay):
                tf.summary.scalar(f"decay/{penalty.name}", decay(context), step=step)
            norm = tf.linalg.global_norm([tf.cast(v, tf.float32) for v in variables])
            tf.summary.scalar(f"norm/{penalty.name}", norm, step=step)


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
