"""A user's plugin, written only against tapeloop's public API, loaded with `--import=cli_plugin`.

It registers two tasks, `tiny_linear` (a Dense(1) linear regression on a fixed NumPy dataset,
a few seconds of training) and `tiny_norm` (with a LayerNormalization, for `--describe`), and a
penalty, `l1_test` (`scale · Σ|w|`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import keras
import numpy as np
import tensorflow as tf

from trainer import Penalty, Strength, Trainer, register_penalty, register_task

FEATURES = 4
EXAMPLES = 64


def make_data(n: int = EXAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`(x, y)` with `y = x·w + 0.3 + noise`, the same on every call."""
    rng = np.random.RandomState(seed)
    x = rng.randn(n, FEATURES).astype(np.float32)
    w = np.array([[1.0], [-2.0], [0.5], [0.0]], np.float32)
    y = (x @ w + 0.3 + 0.1 * rng.randn(n, 1)).astype(np.float32)
    return x, y


@register_task("tiny_linear")
class TinyLinear(Trainer):
    """Linear regression, 4 features -> 1 output, on 64 fixed examples."""

    default_options: ClassVar[dict] = {
        "optimizer": "sgd",
        "learning_rate": 0.05,
        "batch_size": 16,
        "train_steps": 20,
        "steps_per_loop": 10,
    }

    def build_model(self) -> keras.Model:
        return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1)])

    def train_dataset(self) -> tf.data.Dataset:
        x, y = make_data()
        return (
            tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=self.options.seed)
            .repeat()
            .batch(self.options.batch_size, drop_remainder=True)
        )

    def eval_dataset(self) -> tf.data.Dataset:
        x, y = make_data(seed=1)
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(32)

    def compute_loss(self, labels: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(tf.square(labels - outputs), axis=-1)


@register_task("tiny_norm")
class TinyNorm(TinyLinear):
    """3 features -> Dense(8) -> LayerNormalization -> Dense(1): biases and a norm layer.

    Differs from TinyLinear only in its model, for `--describe`.
    """

    def build_model(self) -> keras.Model:
        return keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(8, name="hidden"),
                keras.layers.LayerNormalization(name="norm"),
                keras.layers.Dense(1, name="out"),
            ],
            name="tiny",
        )


@register_penalty("l1_test")
class L1(Penalty):
    """`scale · Σ|w|`: a plugin in its simplest form, its strength read as `self.scale`."""

    scale = Strength()
    has_loss = True

    def __init__(self, scale: float = 0.01, **selection: Any):
        super().__init__(**selection)
        self.scale = scale

    def loss(self, variables: Sequence[Any]) -> tf.Tensor:
        return self.scale * tf.add_n([tf.reduce_sum(tf.abs(v)) for v in variables])
