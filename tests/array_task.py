"""Test helpers: a Trainer over in-memory arrays with batches in order, a small named model, and
TensorFlow's op determinism set for a block."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import keras
import numpy as np
import tensorflow as tf

from trainer import Trainer


def small_model(regularizer: keras.regularizers.Regularizer | None = None) -> keras.Model:
    """4 -> Dense(3) -> LayerNorm -> Dense(2), with stable paths (`net/hidden/kernel`, ...)."""
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="tanh", name="hidden", kernel_regularizer=regularizer),
            keras.layers.LayerNormalization(name="norm"),
            keras.layers.Dense(2, name="out"),
        ],
        name="net",
    )


def mse(labels: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.square(labels - outputs), axis=-1)


def regression_data(n: int = 64, features: int = 4, outputs: int = 2, seed: int = 0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, features).astype(np.float32)
    y = (x @ rng.randn(features, outputs) + 0.1 * rng.randn(n, outputs)).astype(np.float32)
    return x, y


class ArrayTask(Trainer):
    """Trains `model_fn()` on `(x, y)` in order, without shuffling, so runs can be compared."""

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        options=None,
        *,
        model_fn: Callable[[], keras.Model] = small_model,
        loss_fn: Callable = mse,
        optimizer: Callable[[], keras.optimizers.Optimizer] | None = None,
        penalties=(),
        strategy=None,
    ):
        super().__init__(options, penalties=penalties, strategy=strategy)
        self.x, self.y = x, y
        self._model_fn, self._loss_fn, self._optimizer_fn = model_fn, loss_fn, optimizer

    def build_model(self) -> keras.Model:
        return self._model_fn()

    def build_optimizer(self) -> keras.optimizers.Optimizer:
        return self._optimizer_fn() if self._optimizer_fn else super().build_optimizer()

    def train_dataset(self) -> tf.data.Dataset:
        return (
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
            .repeat()
            .batch(self.options.batch_size, drop_remainder=True)
        )

    def eval_dataset(self) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((self.x, self.y)).batch(16)

    def compute_loss(self, labels: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
        return self._loss_fn(labels, outputs)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, steps: int):
    """The batches `ArrayTask.train_dataset` yields, for hand-written reference loops."""
    if len(x) % batch_size:
        raise ValueError(f"len(x) ({len(x)}) must be a multiple of batch_size ({batch_size}).")
    for step in range(steps):
        start = step * batch_size % len(x)
        yield x[start : start + batch_size], y[start : start + batch_size]


@contextlib.contextmanager
def op_determinism(enabled: bool) -> Iterator[None]:
    """TensorFlow's process-wide op determinism set to `enabled` in the block, then restored.

    A Trainer with `deterministic=True` turns it on for the rest of the process, and under it
    TensorFlow refuses the timestamps that measure input waits (`input_wait_share` is None):
    tests of the measurement run with it off, whatever ran before them.
    """
    from tensorflow.python.framework import config  # no public way to query or turn it off

    def set_to(value: bool) -> None:
        (config.enable_op_determinism if value else config.disable_op_determinism)()

    before = config.is_op_determinism_enabled()
    set_to(enabled)
    try:
        yield
    finally:
        set_to(before)


def free_ports(count: int) -> list[int]:
    """`count` TCP ports on 127.0.0.1 that were free a moment ago (for TF_CONFIG clusters)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
