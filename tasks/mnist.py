"""MNIST with the seed article's model: Dense(64, relu) -> Dense(10), on TFDS `mnist`."""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import keras
import tensorflow as tf

from tasks import tfds_data
from trainer import Trainer, augment_classification, read_to_memory, register_task


def scale_pixels(images: tf.Tensor) -> tf.Tensor:
    """uint8 pixels k to float32 k/255, in [0, 1]: the same floats everywhere.

    Divided in float64, then rounded: graph optimizations and XLA turn `x / 255.0` into
    `x * (1/255)`, which in float32 rounds 126 of the 256 values 1 ulp away from NumPy's
    `k / np.float32(255)`; in float64 the product is within 1e-16 of k/255, far closer than
    any k/255 lies to a float32 rounding boundary, so eager, graph and XLA runs all give
    NumPy's floats. Three elementwise ops: ~3x cheaper per batch than a 256-entry table
    lookup per pixel outside XLA (0.29 vs 0.94 ms for a cifar10 batch on 2 cores).
    """
    return tf.cast(tf.cast(images, tf.float64) / 255.0, tf.float32)


@register_task("mnist")
class Mnist(Trainer):
    """The seed article's MLP (784 -> 64 relu -> 10 logits) with sparse cross-entropy.

    The training split is read once into arrays as stored (uint8 images, int64 labels) when
    it fits in `options.in_memory_fraction` of the RAM (`train_arrays`: batches gathered
    in-graph), else it comes through a tf.data pipeline; either way `preprocess` scales
    each batch inside the step.

    With `label_smoothing` or `mixup_alpha`, `augment` turns the training batches' labels
    into soft targets, and `compute_loss` takes those with a categorical cross-entropy;
    evaluation keeps the integer labels and the sparse cross-entropy.
    """

    default_options: ClassVar[dict] = {"train_steps": 2000, "batch_size": 128, "eval_every": 1000}
    sweep_metric = ("accuracy", "max")
    dataset_name = "mnist"
    download_host = "storage.googleapis.com"
    num_classes = 10

    def build_model(self) -> keras.Model:
        return keras.Sequential(
            [
                keras.Input((784,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(10),
            ]
        )

    def _load(self, split: str) -> tf.data.Dataset:
        return tfds_data.load(self.dataset_name, split, self.options.data_dir, self.download_host)

    @functools.cached_property
    def _train_arrays(self) -> Any | None:
        return read_to_memory(self._load("train"), self)  # logs which path and why, once

    def train_arrays(self) -> Any | None:
        return self._train_arrays

    def train_dataset(
        self, input_context: tf.distribute.InputContext | None = None
    ) -> tf.data.Dataset:
        """Batches of `batch_size`; with `input_context` (under a strategy), this worker's
        per-replica batches: its shard of the examples when streaming."""
        if self.train_arrays() is not None:  # the arrays' batches, in the in-graph order
            return super().train_dataset(input_context)
        # For data that does not fit in memory: no cache(), and no per-example map
        # (`preprocess` converts whole batches in the step).
        dataset, batch_size = self._load("train"), self.options.batch_size
        if input_context is not None:  # each worker reads its shard, batched per replica
            dataset = dataset.shard(
                input_context.num_input_pipelines, input_context.input_pipeline_id
            )
            batch_size = input_context.get_per_replica_batch_size(batch_size)
        return (
            dataset.shuffle(10_000, seed=self.options.seed)
            .repeat()
            .batch(batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        )

    def eval_dataset(self) -> tf.data.Dataset:
        return self._load("test").batch(1024).prefetch(tf.data.AUTOTUNE)

    def preprocess(self, features: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """uint8 images `[batch, 28, 28, 1]` to float32 pixels in [0, 1], `[batch, 784]`."""
        return tf.reshape(scale_pixels(features), [-1, 784]), labels

    def augment(self, features: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """`label_smoothing` and `mixup_alpha` (`augment_classification`); unchanged when off."""
        return augment_classification(
            features,
            labels,
            num_classes=self.num_classes,
            label_smoothing=self.options.label_smoothing,
            mixup_alpha=self.options.mixup_alpha,
            seed=self.augment_seed,
        )

    def compute_loss(self, labels: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
        """Sparse cross-entropy on integer labels; categorical on soft targets (`augment`)."""
        if labels.dtype.is_floating:
            return keras.losses.categorical_crossentropy(labels, outputs, from_logits=True)
        return keras.losses.sparse_categorical_crossentropy(labels, outputs, from_logits=True)

    def build_metrics(self) -> dict[str, keras.metrics.Metric]:
        return {"accuracy": keras.metrics.SparseCategoricalAccuracy()}
