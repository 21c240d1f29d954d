"""A task for the multi-worker and signal CLI tests: writes its final weights where the test
asks, and can signal itself at a chosen step or slow down after one (environment variables)."""

import os
import signal
import threading
import time
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


def slow(x, y):
    """The batch, 30 s later (a sleep outside the main thread, which runs the loop)."""
    x_later = tf.numpy_function(lambda v: time.sleep(30) or v, [x], tf.float32)
    return tf.ensure_shape(x_later, x.shape), y


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
        """Batches in order; with `DIST_SLOW_AFTER_STEP=k`, each batch after the k-th takes
        30 s (a loop that no signal handler in the main thread could interrupt)."""
        x, y = data()
        ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat()
        ds = ds.batch(self.options.batch_size, drop_remainder=True)
        slow_after = os.environ.get("DIST_SLOW_AFTER_STEP")
        if slow_after:
            k = int(slow_after)
            ds = ds.take(k).concatenate(ds.skip(k).map(slow))
        return ds

    def compute_loss(self, labels, outputs):
        return tf.reduce_mean(tf.square(labels - outputs), axis=-1)

    def evaluate(self, dataset=None):
        """With `SIGNAL_AT_STEP=4:SIGTERM`, sends this process that signal at step 4, and
        again `SIGNAL_AGAIN_AFTER_S` seconds later from a thread, if that is set."""
        step, _, name = os.environ.get("SIGNAL_AT_STEP", "").partition(":")
        if step == str(self.step):
            sig = signal.Signals[name]
            os.kill(os.getpid(), sig)
            again = os.environ.get("SIGNAL_AGAIN_AFTER_S")
            if again:
                timer = threading.Timer(float(again), os.kill, (os.getpid(), sig))
                timer.daemon = True
                timer.start()
        return super().evaluate(dataset)

    def train(self):
        result = super().train()
        out = os.environ.get("DIST_WEIGHTS_OUT")
        if out:
            np.savez(out, *self.model.get_weights())
        return result
