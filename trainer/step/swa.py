"""Stage 5, after the update: stochastic weight averaging (SWA) with BatchNorm recalibration."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer.errors import ConfigError
from trainer.optimizers import is_loss_scaled
from trainer.step.stage import Stage, StepState


class StochasticWeightAverage(Stage):
    """The arithmetic mean of the trainable weights taken every `every` optimizer steps
    after `start` (SWA, Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and
    Better Generalization").

    After optimizer step s (the 1-based count of updates the optimizer applied, its
    `iterations`), a snapshot is taken when s > `start` and (s − `start`) % `every` == 0:
    `average += (w − average) / (n + 1)`, then n += 1, n the snapshots so far (as
    `torch.optim.swa_utils.AveragedModel`). A step a `LossScaleOptimizer` skipped is no
    optimizer step: it takes no snapshot and does not count. Training continues on the raw
    weights; the averages and n are checkpointed (the averages keyed by their weight's path,
    which the checkpoint turns into positions).

    Evaluation, export, the best checkpoint, sweeps and Keras callbacks use `evaluated()`:
    the model then holds the averaged trainable weights (the raw ones before the first
    snapshot) and, when it has BatchNormalization layers, their moving statistics
    recomputed for those weights over the first `bn_batches` training batches
    (`recalibrate`). Other non-trainable weights are not averaged: they keep the trained
    model's values.

    Args:
      start: the optimizer step after which snapshots begin, ≥ 0.
      every: the optimizer steps between snapshots, ≥ 1.
      optimizer: the optimizer, whose `iterations` count the steps.
      variables: the trainable variables to average.
      model: the model, whose trainable BatchNormalization layers are recalibrated.
      batches: returns an iterable over the training batches as the step takes them
        (preprocessed `(features, labels)`), from the first, each time it is called.
      bn_batches: the batches the BatchNorm statistics are recomputed over, ≥ 1.
      use_tf_function: run the recalibration's forward passes in a `tf.function`.

    Raises:
      ConfigError: the model has a BatchNormalization layer with `renorm=True`, whose
        extra statistics this recalibration does not recompute.
    """

    phase = "after_update"

    def __init__(
        self,
        start: int,
        every: int,
        optimizer: keras.optimizers.Optimizer,
        variables: Sequence[Any],
        *,
        model: keras.Model,
        batches: Callable[[], Iterable[Any]],
        bn_batches: int,
        use_tf_function: bool = True,
    ):
        self.start, self.every, self.bn_batches = start, every, bn_batches
        self.optimizer = optimizer
        self.variables = list(variables)
        self.model = model
        self.batches = batches
        self.loss_scaled = is_loss_scaled(optimizer)
        self.norms = batch_norm_layers(model)
        for layer in self.norms:
            if getattr(layer, "renorm", False):
                raise ConfigError(
                    f"`swa_every` ({every}) cannot recalibrate BatchNormalization layer "
                    f"{layer.name!r} with renorm=True; use renorm=False or turn SWA off."
                )
        # Written from the first replica: every replica holds the same values.
        first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.averages = {
            v.path: tf.Variable(v.numpy(), trainable=False, name="swa", aggregation=first)
            for v in self.variables
        }
        self.count = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="swa_models", aggregation=first
        )
        self._forward = self._statistics
        if use_tf_function:
            self._forward = tf.function(self._statistics, reduce_retracing=True)

    def describe(self) -> str:
        line = f"swa from step {self.start} every {self.every}"
        if self.norms:
            line += f" (BN recalibrated over {self.bn_batches} batches)"
        return line

    def __call__(self, state: StepState) -> None:
        step = tf.identity(self.optimizer.iterations.value)  # after this update
        take = tf.logical_and(step > self.start, (step - self.start) % self.every == 0)
        if self.loss_scaled:
            take = tf.logical_and(take, state.applied(self.optimizer) > 0)
        # Not a `tf.cond`: the averages' writes synchronize the replicas, which a branch of
        # the replica function cannot. `where` keeps an average bit for bit when not taken.
        n = self.count.read_value() + 1  # with this snapshot
        for variable in self.variables:
            average = self.averages[variable.path]
            weight = tf.cast(variable.value, average.dtype)
            updated = average + (weight - average) / tf.cast(n, average.dtype)
            average.assign(tf.where(take, updated, average))
        self.count.assign_add(tf.cast(take, tf.int64))

    def checkpoint_objects(self) -> dict[str, Any]:
        return {"swa_variables": dict(self.averages), "swa_models": self.count}

    def state_variables(self) -> list[tf.Variable]:
        return [*self.averages.values(), self.count]

    @contextlib.contextmanager
    def evaluated(self) -> Iterator[None]:
        """Within it, the trainable weights are the average (once a snapshot was taken) and
        the BatchNorm statistics recalibrated for them; every model variable is put back
        after, bit for bit."""
        if int(self.count.numpy()) == 0:
            yield
            return
        variables = list(self.model.variables)
        raw = [v.numpy() for v in variables]
        try:
            for variable in self.variables:
                variable.assign(self.averages[variable.path].read_value())
            self.recalibrate()
            yield
        finally:
            for variable, value in zip(variables, raw, strict=True):
                variable.assign(value)

    def recalibrate(self) -> int:
        """Sets each trainable BatchNormalization layer's moving mean and variance to the
        average over the first `bn_batches` training batches of that layer's batch
        statistics, computed by forward passes in training mode with the model's current
        weights: the batch mean and Keras' biased batch variance, each averaged with equal
        weight per batch (`torch.optim.swa_utils.update_bn` with momentum=None). Nothing
        is read or changed without such a layer. Returns the batches used (fewer when the
        data has fewer; with none, the statistics are left as they were, with a warning).

        The forward passes update other state as training would (a dropout's seed, say):
        `evaluated()` puts it back.
        """
        if not self.norms:
            return 0
        moving = [v for layer in self.norms for v in (layer.moving_mean, layer.moving_variance)]
        before = [v.numpy() for v in moving]
        momenta = [layer.momentum for layer in self.norms]
        sums: list[np.ndarray] | None = None
        count = 0
        try:
            for layer in self.norms:  # moving = moving·0 + batch statistic (finite start)
                layer.momentum = 0.0
                layer.moving_mean.assign(tf.zeros_like(layer.moving_mean))
                layer.moving_variance.assign(tf.ones_like(layer.moving_variance))
            for features, _ in itertools.islice(self.batches(), self.bn_batches):
                statistics = [s.numpy().astype(np.float64) for s in self._forward(features)]
                sums = statistics if sums is None else [a + s for a, s in zip(sums, statistics)]
                count += 1
        finally:
            for layer, momentum in zip(self.norms, momenta, strict=True):
                layer.momentum = momentum
        if sums is None:
            logging.warning("SWA: the training data has no batch; BatchNorm keeps its statistics.")
            recalibrated = before
        else:
            recalibrated = [(total / count).astype(v.dtype) for v, total in zip(moving, sums)]
        for variable, value in zip(moving, recalibrated, strict=True):
            variable.assign(value)
        return count

    def _statistics(self, features: Any) -> list[tf.Tensor]:
        """One forward pass in training mode with momentum 0: each layer's moving mean and
        variance are then its batch statistics."""
        self.model(features, training=True)
        return [
            tf.identity(v.value)
            for layer in self.norms
            for v in (layer.moving_mean, layer.moving_variance)
        ]


def batch_norm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """The model's trainable BatchNormalization layers (frozen ones keep their statistics in
    training too), nested ones included, in the model's order."""
    layers = model._flatten_layers(include_self=False, recursive=True)
    return [
        layer
        for layer in layers
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]
