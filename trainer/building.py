"""Building a Trainer's model under its precision policy and its optimizer with a loss scale."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf


def build_model_with_policy(trainer: Any) -> keras.Model:
    """`trainer.build_model()` under `options.mixed_precision`, called once on a batch of
    zeros shaped like a training batch (through `trainer.preprocess`) if it has no weights
    yet."""
    policy = trainer.options.mixed_precision
    previous = keras.mixed_precision.global_policy()
    if policy:
        keras.mixed_precision.set_global_policy(policy)
    try:
        model = trainer.build_model()
        if not model.built or not model.trainable_variables:
            spec = trainer.train_dataset().element_spec
            zeros = lambda s: tf.zeros([d or 1 for d in s.shape], s.dtype)  # noqa: E731
            model(trainer.preprocess(*tf.nest.map_structure(zeros, spec))[0])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return model


def build_optimizer_with_loss_scale(trainer: Any) -> keras.optimizers.Optimizer:
    """`trainer.build_optimizer()`, wrapped in a `LossScaleOptimizer` under mixed_float16."""
    optimizer = trainer.build_optimizer()
    if trainer.options.mixed_precision == "mixed_float16" and not isinstance(
        optimizer, keras.optimizers.LossScaleOptimizer
    ):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
