"""Training techniques around the step: LR schedules with warmup, global-norm clipping,
gradient accumulation and an exponential moving average (EMA) of the weights.

One optimizer step, in order (see README): gradients (summed over `accumulate_steps`
micro-batches) → clip their global norm → decoupled penalties' updates → the optimizer's
update → the EMA. Each technique that is off adds no op to the compiled step: every branch
here is taken in Python, when the step is traced.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf

from trainer.errors import ConfigError
from trainer.penalties import square_sum, upstream_after


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
        return {"kind": self.kind, "learning_rate": self.learning_rate,
                "train_steps": self.train_steps, "warmup_steps": self.warmup_steps,
                "end_learning_rate": self.end_learning_rate}  # fmt: skip


def learning_rate_for(options: Any) -> Any:
    """The learning rate the options ask for: `options.learning_rate` (a float) with
    `lr_schedule="constant"` and no warmup, else a `WarmupSchedule`. A task that overrides
    `build_optimizer` passes this to its optimizer to follow `--lr_schedule`."""
    if options.lr_schedule == "constant" and not options.warmup_steps:
        return options.learning_rate
    return WarmupSchedule(options.lr_schedule, options.learning_rate, options.train_steps,
                          options.warmup_steps, options.end_learning_rate)  # fmt: skip


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


class Techniques:
    """A built Trainer's clipping, accumulation and EMA, called from its `train_step`.

    Args:
      options: the `TrainerOptions`.
      optimizer: the built optimizer (possibly a `LossScaleOptimizer`).
      variables: the trainable variables, in the gradients' order.

    Create it under the strategy's scope: its variables (the EMA, the last gradient norm)
    are then mirrored, written from the first replica (all replicas hold the same values).
    """

    def __init__(self, options: Any, optimizer: Any, variables: Sequence[Any]):
        self.options = options
        self.optimizer = optimizer
        self.variables = list(variables)
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.grad_norm = (
            tf.Variable(0.0, trainable=False, name="grad_norm", aggregation=first)
            if options.clip_global_norm else None
        )  # fmt: skip
        self.averages = {
            v.path: tf.Variable(v.numpy(), trainable=False, name="ema", aggregation=first)
            for v in self.variables
        } if options.ema_decay else {}  # fmt: skip

    def describe(self) -> str:
        """One line of the techniques in force ("" when none), for the start-up table."""
        o = self.options
        parts = []
        if o.lr_schedule != "constant" or o.warmup_steps:
            parts.append(
                f"lr_schedule={o.lr_schedule} (warmup {o.warmup_steps} steps to "
                f"{o.learning_rate:g}, {o.end_learning_rate:g} at step {o.train_steps})"
            )
        if o.clip_global_norm:
            parts.append(f"clip_global_norm={o.clip_global_norm:g}")
        if o.accumulate_steps > 1:
            parts.append(f"accumulate_steps={o.accumulate_steps} (micro-batches of "
                         f"{o.batch_size // o.accumulate_steps})")  # fmt: skip
        if o.ema_decay:
            parts.append(f"ema_decay={o.ema_decay:g} (evaluation and export use the EMA)")
        return "\ntechniques: " + ", ".join(parts) if parts else ""

    def checkpoint_objects(self) -> dict[str, Any]:
        """The EMA variables keyed by their weight's path (nothing without `ema_decay`)."""
        return {"ema_variables": dict(self.averages)} if self.averages else {}

    @property
    def state_variables(self) -> list[Any]:
        """Variables a `Trainer.get_state`/`set_state` carries: the EMA's."""
        return list(self.averages.values())

    # ---- the step ----------------------------------------------------------------------

    def accumulate(self, trainer: Any, batch: Any) -> tuple[list[Any], list[tf.Tensor]]:
        """Gradients summed over `accumulate_steps` micro-batches of this replica's batch.

        Each micro-batch's data loss is its share of the global mean (`/k`); loss penalties
        and Keras regularizer losses enter once, with the first micro-batch. Returns the
        gradients and the loss breakdown of the whole batch.
        """
        k = self.options.accumulate_steps
        features, labels = batch
        size = tf.nest.flatten(labels)[0].shape[0]
        if size is not None and size % k:
            raise ConfigError(f"accumulate_steps ({k}) must divide each replica's batch "
                              f"({size} examples).")  # fmt: skip
        splits = [tf.split(t, k) for t in tf.nest.flatten((features, labels))]
        total_grads, data_sum = None, 0.0
        for i in range(k):
            f, l_ = tf.nest.pack_sequence_as((features, labels), [s[i] for s in splits])
            with tf.GradientTape() as tape:
                _, data, *terms = trainer.compute_losses(f, l_)
                loss = data / k
                if i == 0:
                    penalty = tf.nn.scale_regularization_loss(tf.add_n(terms)) if terms else 0.0
                    loss, first_terms = loss + penalty, terms
                if self.loss_scaled:
                    loss = self.optimizer.scale_loss(loss)
            grads = tape.gradient(loss, self.variables, upstream_after(terms) if i == 0 else None)
            total_grads = grads if total_grads is None else [
                a if b is None else b if a is None else a + b for a, b in zip(total_grads, grads)
            ]  # fmt: skip
            data_sum += data
        data = data_sum / k
        return total_grads, [data + penalty, data, *first_terms]

    def apply(self, gradients: list[Any], updates: Any) -> None:
        """Clip → decoupled `updates` → the optimizer's update → EMA."""
        gradients = self.clip(gradients)
        updates(gradients)
        before = tf.identity(self.optimizer.iterations.value) if self.averages else None
        self.optimizer.apply_gradients(zip(gradients, self.variables))
        if self.averages:
            self._update_averages(before)

    def clip(self, gradients: list[Any]) -> list[Any]:
        """Gradients scaled so that their global norm (summed over replicas, unscaled by the
        loss scale) is at most `clip_global_norm`, as Keras' `global_clipnorm`."""
        clip = self.options.clip_global_norm
        if not clip:
            return gradients
        present = [g for g in gradients if g is not None]
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            present = replica.all_reduce(tf.distribute.ReduceOp.SUM, present)
        # Σg² as L2's Σw² (`square_sum`): XLA:CPU runs tf.linalg.global_norm's reductions
        # as scalar loops.
        norm = tf.sqrt(tf.add_n([square_sum(tf.cast(g, tf.float32)) for g in present]))
        if self.loss_scaled:
            norm = norm / tf.cast(self.optimizer.dynamic_scale, norm.dtype)
        self.grad_norm.assign(norm)
        scale = clip * tf.minimum(1.0 / norm, 1.0 / clip) + (norm - norm)  # NaN stays NaN
        return [None if g is None else g * tf.cast(scale, g.dtype) for g in gradients]

    def _update_averages(self, before: tf.Tensor) -> None:
        """`ema = m·ema + (1−m)·w`, m = `ema_decay` except 0 at the first step (Keras'
        formula); unchanged (m = 1) on a step the loss-scale optimizer skipped."""
        iterations = self.optimizer.iterations
        momentum = self.options.ema_decay * tf.cast(tf.not_equal(before, 0), tf.float32)
        if self.loss_scaled:
            applied = tf.cast(tf.not_equal(tf.identity(iterations.value), before), tf.float32)
            momentum = applied * momentum + (1.0 - applied)
        for variable in self.variables:
            average = self.averages[variable.path]
            m = tf.cast(momentum, average.dtype)
            average.assign(m * average + (1 - m) * tf.cast(variable.value, average.dtype))

    # ---- outside the step --------------------------------------------------------------

    def summary_tags(self) -> list[str]:
        """Extra per-step TensorBoard tags: `grad_norm` (before clipping) when clipping."""
        return ["grad_norm"] if self.grad_norm is not None else []

    def summary_values(self) -> list[tf.Tensor]:
        """The values for `summary_tags`, read in the train loop."""
        return [self.grad_norm.read_value()] if self.grad_norm is not None else []

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Within it, the model's trainable weights are the EMA (once a step has run);
        the raw weights are put back after, bit for bit. Without `ema_decay`, a no-op."""
        if not self.averages or int(self.optimizer.iterations.numpy()) == 0:
            yield
            return
        raw = [v.numpy() for v in self.variables]
        for variable in self.variables:
            variable.assign(self.averages[variable.path].read_value())
        try:
            yield
        finally:
            for variable, value in zip(self.variables, raw):
                variable.assign(value)
