"""Training techniques around the step: LR schedules with warmup, global-norm clipping,
gradient accumulation and an exponential moving average (EMA) of the weights.

One optimizer step, in order (see README): gradients (summed over `accumulate_steps`
micro-batches) → clip their global norm → decoupled penalties' updates → the optimizer's
update → the EMA. Each technique that is off adds no op to the compiled step: every branch
here is taken in Python, when the step is traced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow as tf

from trainer.errors import ConfigError
from trainer.numerics import square_sum, upstream_after
from trainer.optimizers import is_loss_scaled


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
        self.loss_scaled = is_loss_scaled(optimizer)
        first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.grad_norm = (
            tf.Variable(0.0, trainable=False, name="grad_norm", aggregation=first)
            if options.clip_global_norm
            else None
        )
        self.averages = (
            {
                v.path: tf.Variable(v.numpy(), trainable=False, name="ema", aggregation=first)
                for v in self.variables
            }
            if options.ema_decay
            else {}
        )

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
            parts.append(
                f"accumulate_steps={o.accumulate_steps} (micro-batches of "
                f"{o.batch_size // o.accumulate_steps})"
            )
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
            raise ConfigError(
                f"accumulate_steps ({k}) must divide each replica's batch ({size} examples)."
            )
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
            total_grads = (
                grads
                if total_grads is None
                else [
                    a if b is None else b if a is None else a + b
                    for a, b in zip(total_grads, grads)
                ]
            )
            data_sum += data
        data = data_sum / k
        return total_grads, [data + penalty, data, *first_terms]

    def apply(self, gradients: list[Any], updates: Any, projections: Any) -> None:
        """Clip → decoupled `updates` → the optimizer's update → `projections` → EMA."""
        gradients = self.clip(gradients)
        updates(gradients)
        read = bool(self.averages) or projections.needs_iterations  # to tell a skipped step
        before = tf.identity(self.optimizer.iterations.value) if read else None
        self.optimizer.apply_gradients(zip(gradients, self.variables))
        projections(before)
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
