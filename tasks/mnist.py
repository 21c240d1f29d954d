"""MNIST with the seed article's model: Dense(64, relu) -> Dense(10), on TFDS `mnist`."""

from __future__ import annotations

from typing import ClassVar

import keras
import tensorflow as tf

from tasks import tfds_data
from trainer import Trainer, register_task


def _flatten(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    return tf.reshape(tf.cast(image, tf.float32) / 255.0, [784]), label


@register_task("mnist")
class Mnist(Trainer):
    """The seed article's MLP (784 -> 64 relu -> 10 logits) with sparse cross-entropy."""

    default_options: ClassVar[dict] = {"train_steps": 2000, "batch_size": 128, "eval_every": 1000}
    sweep_metric = ("accuracy", "max")
    dataset_name = "mnist"
    download_host = "storage.googleapis.com"

    def build_model(self) -> keras.Model:
        return keras.Sequential(
            [
                keras.Input((784,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(10),
            ]
        )

    def _load(self, split: str) -> tf.data.Dataset:
        ds = tfds_data.load(self.dataset_name, split, self.options.data_dir, self.download_host)
        # Cache the uint8 images, 4x smaller than the float32 ones the model sees.
        return ds.cache().map(_flatten, num_parallel_calls=tf.data.AUTOTUNE)

    def train_dataset(self) -> tf.data.Dataset:
        return (
            self._load("train")
            .shuffle(10_000, seed=self.options.seed)
            .repeat()
            .batch(self.options.batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        )

    def eval_dataset(self) -> tf.data.Dataset:
        return self._load("test").batch(1024).prefetch(tf.data.AUTOTUNE)

    def compute_loss(self, labels: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
        return keras.losses.sparse_categorical_crossentropy(labels, outputs, from_logits=True)

    def build_metrics(self) -> dict[str, keras.metrics.Metric]:
        return {"accuracy": keras.metrics.SparseCategoricalAccuracy()}
