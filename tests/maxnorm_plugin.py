"""A user's plugin on tapeloop's public API, loaded with `--import=maxnorm_plugin`.

Two penalties written as README's `elastic_net` example, declaring no phase: `max_norm_test`
(`max_value`), a projection after the optimizer's update that rescales each column of the
selected kernels to a norm of at most `max_value`, and `loss_only(scale)`, a loss term
`scale · Σw²`. The task `norm_check` (`tiny_linear`'s data, a hidden layer) checks after every
loop (`on_loop_end`) that every kernel column's norm is at most `NORM_CHECK_MAX` (an
environment variable) times 1 + 1e-6, and prints the largest ratio seen over the run as
`largest column norm / max_value: R`.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf
from cli_plugin import FEATURES, TinyLinear

from trainer import Penalty, Strength, register_penalty, register_task

RELATIVE_SLACK = 1e-6  # float32 rounding of `w · c / ‖w‖`


@register_penalty("max_norm_test")
class MaxNormTest(Penalty):
    """Each column of the selected kernels rescaled to a norm of at most `max_value`."""

    max_value = Strength()

    def __init__(self, max_value=1.0, **selection):
        super().__init__(**selection)
        self.max_value = max_value

    def default_selection(self, variable):
        return len(variable.shape) >= 2

    def project(self, variables):
        for v in variables:
            norms = tf.norm(v, axis=0, keepdims=True)
            v.assign(v * tf.minimum(1.0, self.max_value / tf.maximum(norms, 1e-12)))


@register_penalty("loss_only")
class LossOnly(Penalty):
    """`scale · Σw²`: only `loss()`, nothing declared."""

    scale = Strength()

    def __init__(self, scale=1e-3, **selection):
        super().__init__(**selection)
        self.scale = scale

    def loss(self, variables):
        return self.scale * tf.add_n([tf.reduce_sum(tf.square(v)) for v in variables])


@register_task("norm_check")
class NormCheck(TinyLinear):
    """4 -> Dense(8, tanh) -> Dense(1) on TinyLinear's data; kernels' column norms checked
    after every loop."""

    largest_ratio = 0.0

    def build_model(self):
        return keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(8, activation="tanh", name="hidden"),
                keras.layers.Dense(1, name="out"),
            ],
            name="norm_check",
        )

    def on_loop_end(self, step, logs):
        bound = float(os.environ["NORM_CHECK_MAX"])
        for v in self.model.trainable_variables:
            if len(v.shape) < 2:
                continue
            ratio = float(np.max(np.linalg.norm(v.numpy(), axis=0))) / bound
            if ratio > 1 + RELATIVE_SLACK:
                raise AssertionError(f"step {step}: {v.path} has a column norm {ratio} x bound")
            self.largest_ratio = max(self.largest_ratio, ratio)

    def on_train_end(self, result):
        print(f"largest column norm / max_value: {self.largest_ratio!r}")
