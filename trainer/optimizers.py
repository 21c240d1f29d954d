"""The optimizer: construction by name, the loss-scale wrapper, learning rates and schedules,
and the checks of an optimizer a task builds; the one module that knows Keras' optimizer
internals."""

from __future__ import annotations

import math
import weakref
from typing import Any

import keras
import tensorflow as tf

from trainer.errors import ConfigError, check_choice

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad", "nadam")

# Each optimizer's rate at step 0, in a variable (see `initial_learning_rate`); not an attribute
# of the optimizer, which would track it among its own variables and checkpoints.
_INITIAL_RATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inner(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer a `LossScaleOptimizer` wraps, or `optimizer` itself."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def is_loss_scaled(optimizer: keras.optimizers.Optimizer) -> bool:
    """Whether `optimizer` is a `LossScaleOptimizer` (its steps may be skipped)."""
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def make_optimizer(name: str, learning_rate: Any) -> keras.optimizers.Optimizer:
    """A Keras optimizer by name: one of `OPTIMIZERS`.

    `"momentum"` is SGD with momentum 0.9; `"adamw"` is Keras' `AdamW` with its own default
    `weight_decay` (0.004, on every trainable variable unless `exclude_from_weight_decay` is
    called), which the Trainer's penalty table shows.

    Raises:
      ConfigError: an unknown name.
    """
    check_choice("optimizer", name, OPTIMIZERS)
    if name == "momentum":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    return keras.optimizers.get({"class_name": name, "config": {"learning_rate": learning_rate}})


def with_loss_scale(optimizer: keras.optimizers.Optimizer, mixed_precision: str | None) -> Any:
    """`optimizer`, wrapped in a `LossScaleOptimizer` under mixed_float16 (once)."""
    if mixed_precision == "mixed_float16" and not is_loss_scaled(optimizer):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


@keras.saving.register_keras_serializable("tapeloop")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then `kind` to
    `end_learning_rate` at `train_steps`.

    `cosine` is Keras' `CosineDecay(0.0, train_steps - warmup_steps,
    alpha=end_learning_rate / learning_rate, warmup_target=learning_rate,
    warmup_steps=warmup_steps)` (optax's `warmup_cosine_decay_schedule`); `linear` decays
    linearly instead; `constant` stays at `learning_rate` after the warmup. The step is the
    optimizer's `iterations` (0 at the first update), so with a warmup the first update is
    at rate 0, as in Keras.
    """

    def __init__(self, kind, learning_rate, train_steps, warmup_steps=0, end_learning_rate=0.0):
        self.kind, self.learning_rate, self.train_steps = kind, learning_rate, train_steps
        self.warmup_steps, self.end_learning_rate = warmup_steps, end_learning_rate

    def __call__(self, step: Any) -> tf.Tensor:
        peak = tf.constant(self.learning_rate, tf.float32)
        warmup = tf.constant(float(self.warmup_steps), tf.float32)
        decay_steps = float(max(self.train_steps - self.warmup_steps, 1))
        step = tf.minimum(tf.cast(step, tf.float32), warmup + decay_steps)
        fraction = (step - warmup) / decay_steps
        alpha = self.end_learning_rate / self.learning_rate
        if self.kind == "cosine":
            decayed = (1 - alpha) * (0.5 * (1.0 + tf.cos(math.pi * fraction))) + alpha
        elif self.kind == "linear":
            decayed = (1 - alpha) * (1.0 - fraction) + alpha
        else:
            decayed = tf.constant(1.0)
        if not self.warmup_steps:
            return peak * decayed
        return tf.where(step < warmup, peak * (step / warmup), peak * decayed)

    @property
    def peak_learning_rate(self) -> float:
        """`learning_rate`: the base of decoupled decay's schedule multiplier η_t."""
        return self.learning_rate

    def get_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "learning_rate": self.learning_rate,
            "train_steps": self.train_steps,
            "warmup_steps": self.warmup_steps,
            "end_learning_rate": self.end_learning_rate,
        }


def learning_rate_for(options: Any) -> Any:
    """The learning rate the options ask for: `options.learning_rate` (a float) with
    `lr_schedule="constant"` and no warmup, else a `WarmupSchedule`. A task that overrides
    `build_optimizer` passes this to its optimizer to follow `--lr_schedule`."""
    if options.lr_schedule == "constant" and not options.warmup_steps:
        return options.learning_rate
    return WarmupSchedule(
        options.lr_schedule,
        options.learning_rate,
        options.train_steps,
        options.warmup_steps,
        options.end_learning_rate,
    )


def check_optimizer(optimizer: keras.optimizers.Optimizer, options: Any, owner: str) -> None:
    """Refuses what would silently differ from the options.

    Raises:
      ConfigError: the optimizer has its own `gradient_accumulation_steps` (decoupled decay
        would run on every micro-step) or `use_ema=True` (shadow weights never used), or
        the options ask for a schedule the optimizer (from an overridden `build_optimizer`)
        does not follow.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if getattr(inner, "gradient_accumulation_steps", None):
        raise ConfigError(
            f"{owner}'s optimizer has gradient_accumulation_steps="
            f"{inner.gradient_accumulation_steps}: use the accumulate_steps option instead "
            "(decoupled decay and EMA then run once per optimizer step)."
        )
    if getattr(inner, "use_ema", False):
        raise ConfigError(
            f"{owner}'s optimizer has use_ema=True, whose averages tapeloop would never use: "
            f"use the ema_decay option instead (ema_decay={inner.ema_momentum})."
        )
    if (options.lr_schedule != "constant" or options.warmup_steps) and not isinstance(
        inner._learning_rate, WarmupSchedule
    ):
        raise ConfigError(
            f"lr_schedule={options.lr_schedule!r}, warmup_steps={options.warmup_steps}: "
            f"{owner}.build_optimizer does not use them; build its optimizer with "
            "trainer.learning_rate_for(self.options) or leave those options at their defaults."
        )


def initial_learning_rate(optimizer: keras.optimizers.Optimizer) -> tf.Variable:
    """The learning rate at step 0: the base of the paper's schedule multiplier η_t.

    One variable per optimizer, shared by its callers and read when the graph runs, so that
    `set_learning_rate` (a sweep's next rate) moves it with the rate without retracing.
    """
    optimizer = inner(optimizer)
    if optimizer not in _INITIAL_RATES:
        lr = optimizer._learning_rate  # the schedule or the variable, before evaluation
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            # A warmup starts at 0: its peak, the options' learning_rate, is the base.
            lr = getattr(lr, "peak_learning_rate", None) or lr(0)
        value = tf.cast(tf.convert_to_tensor(lr), tf.float32)
        _INITIAL_RATES[optimizer] = tf.Variable(value, trainable=False, name="initial_lr")
    return _INITIAL_RATES[optimizer]


def set_learning_rate(optimizer: keras.optimizers.Optimizer, value: float) -> None:
    """Sets a constant learning rate, and the base of η_t with it, without retracing.

    Raises:
      ConfigError: the optimizer follows a schedule (its rate is no variable to assign).
    """
    variable = learning_rate_variable(optimizer)
    if variable is None:
        raise ConfigError(
            f"learning_rate={value:g} cannot be set: the optimizer follows a schedule "
            "(lr_schedule or warmup_steps); sweep the learning rate with a constant one."
        )
    variable.assign(value)
    initial_learning_rate(optimizer).assign(value)


def learning_rate_variable(optimizer: keras.optimizers.Optimizer) -> Any | None:
    """The optimizer's learning-rate variable; None when it follows a schedule."""
    found = [v for v in inner(optimizer).variables if v.path.endswith("/learning_rate")]
    return found[0] if found else None


def learning_rate_setting(optimizer: keras.optimizers.Optimizer) -> Any:
    """The learning rate as recorded for resume: the schedule's config, or the float."""
    rate = inner(optimizer)._learning_rate  # the schedule or the variable, before evaluation
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        return repr(keras.optimizers.schedules.serialize(rate))
    return float(f"{float(rate.numpy()):.7g}")
