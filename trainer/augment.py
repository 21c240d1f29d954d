"""Data regularization on training batches: label smoothing and mixup, in-graph, seeded."""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf


def smooth_labels(labels: tf.Tensor, num_classes: int, epsilon: float) -> tf.Tensor:
    """Soft targets `onehot·(1−ε) + ε/K` from labels (Keras' `label_smoothing` formula).

    Args:
      labels: integer class indices `[batch]`, or one-hot / soft targets `[batch, K]`.
      num_classes: K.
      epsilon: the smoothing ε, in [0, 1); 0 gives the one-hot targets.

    Returns:
      float32 targets `[batch, K]`.
    """
    labels = tf.convert_to_tensor(labels)
    if labels.dtype.is_integer:
        labels = tf.one_hot(labels, num_classes, dtype=tf.float32)
    labels = tf.cast(labels, tf.float32)
    if not epsilon:
        return labels
    return labels * (1.0 - epsilon) + epsilon / num_classes


# Philox, named: "auto_select" may change with the device. Under XLA the same Philox seeds give
# other numbers than TensorFlow's kernels (measured with TF 2.21): draws are a function of the
# seed, and of whether the step is XLA-compiled.
_ALG = "philox"
# Marsaglia-Tsang candidates drawn per Gamma variate: each is accepted with probability
# ≥ 0.95 (for a shape ≥ 1), so all 16 are rejected with probability < 1e-20.
_GAMMA_CANDIDATES = 16


def stateless_log_gamma(num: int, seed: tf.Tensor, alpha: float) -> tf.Tensor:
    """`num` stateless draws of log(g), g ~ Gamma(α, 1), in float64, XLA-compilable.

    `tf.random.stateless_gamma` has no XLA kernel, which would keep a compiled train loop
    from using mixup: this is Marsaglia and Tsang's method (2000) for Gamma(α+1), with a
    fixed number of candidates (the first accepted is taken) instead of a rejection loop,
    then Gamma(α) = Gamma(α+1)·U^(1/α). In log space, so that small α (g below float64's
    range) still gives a finite λ = g₁/(g₁+g₂).

    Args:
      num: the number of draws.
      seed: a stateless seed, shape `[2]`.
      alpha: the shape α > 0.

    Returns:
      float64 `[num]`.
    """
    normal_seed, uniform_seed, boost_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3, alg=_ALG)
    )
    d = alpha + 1.0 - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    shape = [_GAMMA_CANDIDATES, num]
    x = tf.random.stateless_normal(shape, normal_seed, dtype=tf.float64, alg=_ALG)
    u = tf.random.stateless_uniform(shape, uniform_seed, dtype=tf.float64, alg=_ALG)
    v = (1.0 + c * x) ** 3
    log_v = tf.math.log(tf.maximum(v, 1e-300))
    accepted = (v > 0) & (tf.math.log(u) < 0.5 * x**2 + d - d * v + d * log_v)
    first = tf.argmax(tf.cast(accepted, tf.int32), axis=0, output_type=tf.int32)
    log_v = tf.gather(tf.transpose(log_v), first[:, None], batch_dims=1)[:, 0]
    boost = tf.random.stateless_uniform([num], boost_seed, dtype=tf.float64, alg=_ALG)
    return math.log(d) + log_v + tf.math.log(boost) / alpha


def mixup_draws(batch_size: Any, alpha: float, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """mixup's random draws for one batch: λ ~ Beta(α, α) and a permutation of the batch.

    Stateless: the same `seed` (and its dtype) gives the same draws, eagerly and in a graph;
    under XLA, the same draws on every call, though not those of TensorFlow's kernels. λ is
    `g₁/(g₁+g₂)` with `g₁, g₂ ~ Gamma(α)` (`stateless_log_gamma`); the permutation is the
    argsort of uniform draws (`stateless_shuffle` has no XLA kernel).

    Args:
      batch_size: examples in the batch (an int or a scalar tensor).
      alpha: α > 0.
      seed: a stateless seed, shape `[2]`, int32 or int64.

    Returns:
      `(λ, permutation)`: a float32 scalar and int32 indices `[batch_size]`.
    """
    gamma_seed, perm_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2, alg=_ALG))
    log_g = stateless_log_gamma(2, gamma_seed, alpha)
    lam = tf.cast(tf.sigmoid(log_g[0] - log_g[1]), tf.float32)
    perm = tf.argsort(tf.random.stateless_uniform([batch_size], perm_seed, alg=_ALG), stable=True)
    return lam, perm


def mixup(features: Any, labels: tf.Tensor, alpha: float, seed: tf.Tensor) -> tuple[Any, tf.Tensor]:
    """mixup (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization"), batch mode.

    One λ ~ Beta(α, α) for the whole batch (as the paper and timm's `mode='batch'`), and one
    permutation π of the batch: `x̃ = λ·x + (1−λ)·x[π]`, `ỹ = λ·y + (1−λ)·y[π]`.

    Args:
      features: float features (a tensor or a nest of them), batch first.
      labels: float soft targets `[batch, K]` (e.g. from `smooth_labels`).
      alpha: α > 0.
      seed: a stateless seed, shape `[2]` (see `mixup_draws`).

    Returns:
      The mixed `(features, labels)`.
    """
    lam, perm = mixup_draws(tf.shape(labels)[0], alpha, seed)

    def mix(t: tf.Tensor) -> tf.Tensor:
        lam_t = tf.cast(lam, t.dtype)
        return lam_t * t + (1 - lam_t) * tf.gather(t, perm)

    return tf.nest.map_structure(mix, features), mix(labels)


def augment_classification(
    features: Any,
    labels: tf.Tensor,
    *,
    num_classes: int,
    label_smoothing: float,
    mixup_alpha: float,
    seed: Any,
) -> tuple[Any, tf.Tensor]:
    """A classification batch with `label_smoothing` and `mixup_alpha` applied (the
    `TrainerOptions` of the same names); unchanged, with no op added, when both are 0.

    With either on, integer labels become float32 soft targets `[batch, K]`: smoothed
    first, then mixed (as timm's `Mixup`). A task's `compute_loss` then takes them with a
    categorical cross-entropy (see `tasks/mnist.py`).

    Args:
      features: the batch's features, after `preprocess`.
      labels: integer class indices `[batch]` or one-hot targets `[batch, K]`.
      num_classes: K.
      label_smoothing: ε in [0, 1).
      mixup_alpha: α ≥ 0; 0 is no mixup.
      seed: a callable returning the step's stateless seed (`Trainer.augment_seed`), called
        only when mixup is on.

    Returns:
      `(features, labels)`.
    """
    if not label_smoothing and not mixup_alpha:
        return features, labels
    labels = smooth_labels(labels, num_classes, label_smoothing)
    if mixup_alpha:
        features, labels = mixup(features, labels, mixup_alpha, seed())
    return features, labels
