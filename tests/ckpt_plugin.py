"""A task for the resume tests: layers in a Python list and Dropout (seed state) to checkpoint,
and a hook that kills or preempts the process at a chosen step, through `evaluate`."""

import os
import signal
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from trainer import Trainer, register_task


class ListNet(keras.Model):
    """Layers kept in a plain Python list, plus Dropout: what `Checkpoint(model=...)` misses."""

    def __init__(self):
        super().__init__()
        self.blocks = [keras.layers.Dense(16, activation="relu"), keras.layers.Dense(16)]
        self.dropout = keras.layers.Dropout(0.3, seed=5)
        self.head = keras.layers.Dense(2)

    def call(self, x, training=False):
        for block in self.blocks:
            x = block(x)
        return self.head(self.dropout(x, training=training))


@register_task("resume_regression")
class ResumeRegression(Trainer):
    """Shuffled batches (the iterator's state matters), Adam, a schedule-free learning rate."""

    default_options: ClassVar[dict] = {
        "batch_size": 8,
        "train_steps": 60,
        "steps_per_loop": 5,
        "eval_every": 10,
        "checkpoint_every": 25,
        "optimizer": "adam",
        "learning_rate": 0.01,
    }

    def build_model(self):
        model = ListNet()
        model(tf.zeros([1, 4]))
        return model

    def train_dataset(self):
        rng = np.random.RandomState(0)
        x = rng.randn(100, 4).astype(np.float32)
        y = (x @ rng.randn(4, 2)).astype(np.float32)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(100, seed=1).repeat()
        return ds.batch(self.options.batch_size, drop_remainder=True)

    def compute_loss(self, labels, outputs):
        return tf.reduce_mean(tf.square(labels - outputs), axis=-1)

    def evaluate(self, dataset=None):
        """Kills (SIGKILL) or preempts (SIGTERM) this process at the step the test chose."""
        for name, sig in (("KILL_AT_STEP", signal.SIGKILL), ("SIGTERM_AT_STEP", signal.SIGTERM)):
            if os.environ.get(name) == str(self.step):
                os.kill(os.getpid(), sig)
        return super().evaluate(dataset)
