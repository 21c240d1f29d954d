"""A task for the multi-worker CLI test: writes its final weights where the test asks."""

import os
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from trainer import Trainer, register_task


def data():
    rng = np.random.RandomState(0)
    x = rng.randn(64, 4).astype(np.float32)
    y = (x @ rng.randn(4, 2)).astype(np.float32)
    return x, y


def mlp() -> keras.Model:
    """4 -> Dense(8, tanh, l2(0.01) kernel regularizer) -> Dense(2)."""
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(
                8, activation="tanh", kernel_regularizer=keras.regularizers.l2(0.01)
            ),
            keras.layers.Dense(2),
        ]
    )


@register_task("dist_regression")
class DistRegression(Trainer):
    """4 -> Dense(8, tanh, l2 kernel regularizer) -> Dense(2); batches in order."""

    default_options: ClassVar[dict] = {
        "batch_size": 16,
        "train_steps": 8,
        "steps_per_loop": 4,
        "optimizer": "adam",
        "learning_rate": 0.01,
    }

    def build_model(self):
        return mlp()

    def train_dataset(self):
        x, y = data()
        ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat()
        return ds.batch(self.options.batch_size, drop_remainder=True)

    def compute_loss(self, labels, outputs):
        return tf.reduce_mean(tf.square(labels - outputs), axis=-1)

    def train(self):
        result = super().train()
        out = os.environ.get("DIST_WEIGHTS_OUT")
        if out:
            np.savez(out, *self.model.get_weights())
        return result
