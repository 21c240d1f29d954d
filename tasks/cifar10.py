"""CIFAR-10 with a small CNN, on TFDS `cifar10`."""

from __future__ import annotations

from typing import ClassVar

import keras
import tensorflow as tf

from tasks.mnist import Mnist, scale_pixels
from trainer import register_task


@register_task("cifar10")
class Cifar10(Mnist):
    """Conv(32)-Pool-Conv(64)-Pool-Dense(128)-Dense(10) with sparse cross-entropy.

    Differs from `Mnist` only in its data, its model and `preprocess`.
    """

    default_options: ClassVar[dict] = {"train_steps": 5000, "batch_size": 128, "eval_every": 1000}
    dataset_name = "cifar10"
    download_host = "www.cs.toronto.edu"

    def build_model(self) -> keras.Model:
        return keras.Sequential(
            [
                keras.Input((32, 32, 3)),
                keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
                keras.layers.MaxPooling2D(),
                keras.layers.Conv2D(64, 3, activation="relu", padding="same"),
                keras.layers.MaxPooling2D(),
                keras.layers.Flatten(),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(10),
            ]
        )

    def preprocess(self, features: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """uint8 images `[batch, 32, 32, 3]` to float32 pixels in [0, 1]."""
        return scale_pixels(features), labels
