"""The workloads: models, random data, optimizer and loss, the same as tapeloop tasks; FLOPs."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from trainer import Trainer, TrainerOptions

NUM_CLASSES = 10
LEARNING_RATE = 1e-3  # Adam's, in every variant


def seed_mlp() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


def big_mlp() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


def small_cnn() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


@dataclasses.dataclass
class Workload:
    name: str
    title: str
    build_model: Callable[[], keras.Model]
    input_shape: tuple[int, ...]
    batch_size: int
    examples: int
    steps: int  # timed steps per variant per round
    repeats: int
    penalties: bool = False  # the penalty-overhead variants
    diagnostics: bool = False  # the hand-loop variants that mimic tapeloop
    matmul_calls: int = 3  # 2048^2 matmuls per timed matmul repetition
    first_steps: int = 100  # steps of an in-graph loop's first (tracing) call
    dataset: tf.data.Dataset | None = None
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after timing

    @property
    def steps_per_call(self) -> int:
        """100 steps per tf.function call, or all the timed steps if fewer."""
        return min(100, self.steps)

    def make_dataset(self) -> tf.data.Dataset:
        """Random features and int labels in [0, 10), pre-batched in memory, repeated.

        The data are sliced into whole batches up front, so that the input pipeline costs
        one slice per step (no per-example batching) and the loops, not tf.data, are timed.
        """
        x, y = self.arrays()
        n = self.examples // self.batch_size
        x = x.reshape((n, self.batch_size, *self.input_shape))
        y = y.reshape((n, self.batch_size))
        return tf.data.Dataset.from_tensor_slices((x, y)).repeat().prefetch(tf.data.AUTOTUNE)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The same examples unbatched: `(x [examples, ...], y [examples])`."""
        rng = np.random.default_rng(0)
        n = self.examples // self.batch_size * self.batch_size
        x = rng.standard_normal((n, *self.input_shape), dtype=np.float32)
        y = rng.integers(0, NUM_CLASSES, (n,), dtype=np.int32)
        return x, y


def forward_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one example's forward pass: Dense and Conv2D layers only."""
    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            macs += layer.kernel.shape[0] * layer.kernel.shape[1]
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            _, oh, ow, _ = layer.output.shape
            macs += oh * ow * cout * kh * kw * cin
    return macs


def train_flops(workload: Workload) -> tuple[int, int]:
    """(forward MACs per example, FLOPs per training step = 3 · 2 · MACs · batch)."""
    macs = forward_macs(workload.build_model())
    return macs, 3 * 2 * macs * workload.batch_size


def new_optimizer() -> keras.optimizers.Optimizer:
    return keras.optimizers.Adam(LEARNING_RATE)


def hand_setup(workload: Workload) -> tuple[keras.Model, list, keras.optimizers.Optimizer, Any]:
    """A hand-written loop's model (seeded), its variables, a built Adam and the loss object."""
    keras.utils.set_random_seed(0)
    model = workload.build_model()
    variables = model.trainable_variables
    optimizer = new_optimizer()
    optimizer.build(variables)
    return model, variables, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class BenchTask(Trainer):
    """A tapeloop task on a workload's model and data; per-example sparse cross-entropy."""

    def __init__(self, workload: Workload, options: TrainerOptions, penalties=(), param_groups=()):
        self.workload = workload
        super().__init__(options, penalties=penalties, param_groups=param_groups)

    def build_model(self) -> keras.Model:
        return self.workload.build_model()

    def train_dataset(self) -> tf.data.Dataset:
        return self.workload.dataset

    def compute_loss(self, labels, outputs):
        return keras.losses.sparse_categorical_crossentropy(labels, outputs, from_logits=True)


class ArraysBenchTask(BenchTask):
    """The same task through `Trainer.train_arrays` (in-memory batches drawn in the loop)."""

    def train_arrays(self):
        return self.workload.arrays()


def workloads(quick: bool, repeats: int | None) -> list[Workload]:
    """The run's workloads, in order; `repeats` (if given) overrides every one's rounds."""
    if quick:
        ws = [
            Workload("seed_mlp", "seed MLP 784-64(relu)-10", seed_mlp, (784,), 128, 4096, 200, 1,
                     penalties=True, diagnostics=True, matmul_calls=1),
            Workload("big_mlp", "compute-bound MLP 784-1024-1024-10", big_mlp, (784,), 256,
                     2048, 5, 1, matmul_calls=1),
            Workload("cnn", "small CNN 32x32x3 Conv32-Pool-Conv64-Pool-Dense128-10", small_cnn,
                     (32, 32, 3), 128, 1024, 5, 1, matmul_calls=1),
        ]  # fmt: skip
    else:
        ws = [
            Workload("seed_mlp", "seed MLP 784-64(relu)-10", seed_mlp, (784,), 128, 8192, 200, 10,
                     penalties=True, diagnostics=True, matmul_calls=2),
            Workload("big_mlp", "compute-bound MLP 784-1024-1024-10", big_mlp, (784,), 256,
                     8192, 40, 3, matmul_calls=2, first_steps=5),
            Workload("cnn", "small CNN 32x32x3 Conv32-Pool-Conv64-Pool-Dense128-10", small_cnn,
                     (32, 32, 3), 128, 4096, 20, 3, matmul_calls=2, first_steps=5),
        ]  # fmt: skip
    if repeats:
        for w in ws:
            w.repeats = repeats
    return ws
