"""The built-in penalties: loss terms (L2, SelectiveL2) and decoupled weight decay."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from trainer.cli.registry import register_penalty
from trainer.errors import ConfigError, check_choice
from trainer.numerics import sum_of_squares
from trainer.penalties.base import Penalty, StepContext, Strength


@register_penalty("l2")
class L2(Penalty):
    """`scale · Σ w²` over all trainable variables: the Keras `l2` regularizer's convention.

    Note there is no ½: `L2(λ)` on a kernel equals `kernel_regularizer=keras.regularizers.l2(λ)`,
    and its gradient is `2λw`.

    Args:
      scale: λ, a non-negative number.
      **selection: `include`, `exclude`, `name`; see `Penalty`.
    """

    scale = Strength()

    def __init__(self, scale: float = 0.01, **selection: Any):
        super().__init__(**selection)
        self.scale = scale

    def loss(self, variables: Sequence[Any]) -> tf.Tensor:
        return self.scale * sum_of_squares(variables)


@register_penalty("selective_l2")
class SelectiveL2(L2):
    """L2 on the variables whose path matches `include` and not `exclude`.

    `SelectiveL2(1e-4, exclude='bias|norm')` regularizes everything but biases and
    normalization parameters; `SelectiveL2(1e-4, include='kernel')` only kernels.

    Args:
      scale: λ, a non-negative number.
      **selection: `include` and/or `exclude` (regexes on `variable.path`, or predicates),
        `name`; see `Penalty`.

    Raises:
      ConfigError: neither `include` nor `exclude` is given (use `L2` for all variables).
    """

    def __init__(self, scale: float = 0.01, **selection: Any):
        if selection.get("include") is None and selection.get("exclude") is None:
            raise ConfigError(
                "SelectiveL2 needs `include` or `exclude` (both are None); "
                "use L2 to regularize every trainable variable."
            )
        super().__init__(scale, **selection)


COUPLINGS = ("learning_rate", "schedule", "absolute")


@register_penalty("decoupled_weight_decay")
class DecoupledWeightDecay(Penalty):
    """Decoupled weight decay: `w ← w − lr_t · rate · w`, applied to the weights directly.

    This is the weight decay of AdamW (Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", ICLR 2019). It never enters the loss or the gradients: an L2 term in
    the loss is rescaled by Adam's per-coordinate normalisation, so weights with large
    gradient history are decayed less than others, which is not what "weight decay" means.
    Under plain SGD the two coincide (`L2(λ/2)` ≡ `DecoupledWeightDecay(λ)`, the paper's
    Proposition 1); under adaptive optimizers they do not.

    The decay is applied to the pre-update weights, before the optimizer's step, as Keras
    (`AdamW`), PyTorch and optax do.

    Args:
      rate: the decay rate (Keras' `weight_decay`), non-negative.
      coupling: how the rate is scaled per step:
        `"learning_rate"` (default; Keras, PyTorch, optax): `lr_t · rate`;
        `"schedule"` (the paper): `η_t · rate`, η_t the learning-rate schedule's multiplier;
        `"absolute"` (TF-Addons' `DecoupledWeightDecayExtension`): `rate`.
      **selection: `include`, `exclude` (by default variables with ndim ≥ 2: kernels, not
        biases or normalization scales), `name`; see `Penalty`.
    """

    rate = Strength()
    decays = True  # one decay per variable: refused next to the optimizer's own

    def __init__(self, rate: float = 0.004, *, coupling: str = "learning_rate", **selection: Any):
        super().__init__(**selection)
        self.coupling = check_choice("coupling", coupling, COUPLINGS)
        self.rate = rate

    def default_selection(self, variable: Any) -> bool:
        return len(variable.shape) >= 2

    def decay(self, context: StepContext) -> tf.Tensor:
        """The multiplicative decay applied this step (`lr_t · rate` by default)."""
        rate = tf.convert_to_tensor(self.rate, tf.float32)
        if self.coupling == "learning_rate":
            return tf.cast(context.learning_rate, tf.float32) * rate
        if self.coupling == "schedule":
            return tf.cast(context.schedule_multiplier, tf.float32) * rate
        return rate

    def update(self, variables: Sequence[Any], context: StepContext) -> None:
        decay = self.decay(context)
        for v in variables:
            v.assign_sub(tf.cast(decay, v.dtype) * v)

    def params(self) -> dict[str, Any]:
        params = super().params()
        if self.coupling != "learning_rate":
            params["coupling"] = self.coupling
        return params
