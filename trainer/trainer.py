"""Trainer: a tf.function GradientTape train step with penalties, a multi-step loop, evaluation."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from trainer import summaries
from trainer.checkpointing import Checkpointer
from trainer.distribution import STRATEGIES, is_chief, is_default, local_devices, make_strategy
from trainer.errors import ConfigError
from trainer.inputs import InMemoryBatches
from trainer.penalties import Penalty, StepContext
from trainer.progress import Progress, format_losses
from trainer.report import coverage_table

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop", "adagrad", "nadam")
MIXED_PRECISION = (None, "mixed_bfloat16", "mixed_float16")


_INT32_MAX = 2**31 - 1  # step counts travel as int32 tensors


def _integer(name: str, value: Any, low: int, high: int = _INT32_MAX) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"`{name}` ({value!r}) must be an integer from {low} to {high}.")


@dataclasses.dataclass(frozen=True)
class TrainerOptions:
    """How to train: the optimizer, batch, step counts and where to write.

    Attributes:
      optimizer: one of `OPTIMIZERS`; used by the default `Trainer.build_optimizer`.
      learning_rate: the optimizer's learning rate, positive.
      batch_size: examples per training step (the global batch), positive.
      train_steps: total optimizer steps, positive.
      steps_per_loop: steps run inside one `tf.function` call, between progress lines;
        positive. Larger is faster; results do not depend on it.
      eval_every: evaluate every this many steps (a loop is cut short to end there); 0
        evaluates only at the end.
      model_dir: directory for `results.json` (and later checkpoints); None writes nothing.
      data_dir: where TFDS tasks look for prepared data; None for TFDS' default.
      seed: seeds Python, NumPy, TensorFlow and Keras for initialisation and shuffling.
      use_tf_function: False runs the very same step eagerly, for debugging.
      strategy: a name in `distribution.STRATEGIES`: `default`, `mirrored`, `multi_worker`
        (cluster from `TF_CONFIG`) or `tpu`; ignored when the Trainer is given a strategy.
      cpu_replicas: with `mirrored`, mirror over this many logical CPUs (for testing).
      mixed_precision: None, `"mixed_bfloat16"` (the CPU choice) or `"mixed_float16"` (GPUs;
        adds a `LossScaleOptimizer`). Weights and penalties stay float32.
      jit_compile: XLA. None (the default) compiles the whole multi-step loop when the task
        gives `train_arrays`, there is no distribution strategy and the model has no
        convolutions on a CPU-only machine, and falls back without XLA if it does not
        compile; True compiles the loop (or, with a `tf.data` input, the step) always; False
        never.
      checkpoint_every: with `model_dir`, save a checkpoint every this many steps (and at the
        end, and on SIGTERM); 0 saves only at the end and on SIGTERM.
      resume_from: a checkpoint path (`<model_dir>/ckpt-<step>`) to resume from instead of
        the latest one, e.g. when the latest is damaged.
      export_dir: write the trained model there as a SavedModel (`model.export`).
      deterministic: enable TensorFlow's op determinism, so that a resumed run ends with
        weights bit-identical to an uninterrupted one.
      summary_every: with `model_dir`, write TensorBoard scalars every this many steps from
        inside the train loop; 0 writes none.
    """

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    batch_size: int = 128
    train_steps: int = 1000
    steps_per_loop: int = 100
    eval_every: int = 0
    model_dir: str | None = None
    data_dir: str | None = None
    seed: int = 0
    use_tf_function: bool = True
    strategy: str = "default"
    cpu_replicas: int = 0
    mixed_precision: str | None = None
    jit_compile: bool | None = None
    checkpoint_every: int = 1000
    resume_from: str | None = None
    export_dir: str | None = None
    deterministic: bool = False
    summary_every: int = 100

    def __post_init__(self):
        for name in ("batch_size", "train_steps", "steps_per_loop"):
            _integer(name, getattr(self, name), 1)
        _integer("eval_every", self.eval_every, 0)
        _integer("checkpoint_every", self.checkpoint_every, 0)
        _integer("summary_every", self.summary_every, 0)
        _integer("seed", self.seed, 0, 2**32 - 1)
        lr = self.learning_rate
        if (
            isinstance(lr, bool)
            or not isinstance(lr, (int, float))
            or not (math.isfinite(lr) and lr > 0)
        ):
            raise ConfigError(f"`learning_rate` ({lr!r}) must be a positive number.")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"`optimizer` ({self.optimizer!r}) must be one of {', '.join(OPTIMIZERS)}."
            )
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"`strategy` ({self.strategy!r}) must be one of {', '.join(STRATEGIES)}."
            )
        _integer("cpu_replicas", self.cpu_replicas, 0, 1024)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"`mixed_precision` ({self.mixed_precision!r}) must be one of "
                f"{', '.join(map(repr, MIXED_PRECISION))}."
            )


def make_optimizer(name: str, learning_rate: Any) -> keras.optimizers.Optimizer:
    """A Keras optimizer by name: one of `OPTIMIZERS` ("momentum" is SGD with momentum 0.9)."""
    if name == "momentum":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    if name not in OPTIMIZERS:
        raise ConfigError(f"`optimizer` ({name!r}) must be one of {', '.join(OPTIMIZERS)}.")
    return keras.optimizers.get({"class_name": name, "config": {"learning_rate": learning_rate}})


class Preempted(Exception):
    """`train()` saved a checkpoint on SIGTERM and stopped; rerunning resumes.

    Attributes:
      step: the step saved.
    """

    EXIT_STATUS = 42  # the CLI's exit status, as TensorFlow's PreemptionCheckpointHandler

    def __init__(self, step: int, path: str):
        super().__init__(f"Preempted (SIGTERM): saved step {step} to {path}; rerun to resume.")
        self.step = step


class Trainer:
    """Trains a Keras model with a GradientTape step and pluggable penalties.

    Subclass it for a task: implement `build_model`, `train_dataset` and `compute_loss`;
    optionally `eval_dataset`, `build_metrics` and `build_optimizer`. Register it with
    `@register_task("name")` to run it from the CLI.

    One step: the model's outputs, per-example losses from `compute_loss`, their average
    over the global batch, plus every loss penalty and the model's own Keras regularizer
    losses (`model.losses`); gradients of that total; then decoupled penalties update their
    weights directly, and the optimizer applies the gradients. `steps_per_loop` steps run
    inside one `tf.function` call.

    Under a `tf.distribute` strategy each replica runs the step on its share of the global
    batch; the data loss is averaged over the global batch and penalties are divided by the
    number of replicas, so that each counts exactly once.

    Args:
      options: a `TrainerOptions`; the defaults when None.
      penalties: the penalties to apply.
      strategy: a `tf.distribute.Strategy`; by default made from `options.strategy`.
    """

    registered_name: str | None = None
    # The held-out metric a sweep ranks runs by, and whether lower ("min") or higher is better.
    sweep_metric: tuple[str, str] = ("loss", "min")

    def __init__(
        self,
        options: TrainerOptions | None = None,
        *,
        penalties: Sequence[Penalty] = (),
        strategy: tf.distribute.Strategy | None = None,
    ):
        self.options = options or TrainerOptions()
        self.strategy = strategy or make_strategy(self.options.strategy, self.options.cpu_replicas)
        devices = local_devices(self.strategy)
        cpus_only = all("CPU" in d for d in devices)
        if self.options.jit_compile is True and len(devices) > 1 and cpus_only:
            raise ConfigError(
                f"`jit_compile` (True) cannot run {len(devices)} replicas on logical CPU devices: "
                "XLA places them all on /cpu:0. Use one CPU replica, or GPUs."
            )
        for p in penalties:
            if not isinstance(p, Penalty):
                raise ConfigError(f"`penalties` must hold Penalty objects, got {p!r}.")
        self.penalties = list(penalties)
        self._model: keras.Model | None = None
        self.optimizer: keras.optimizers.Optimizer | None = None
        self.step = 0

    # ---- hooks for tasks -------------------------------------------------------------

    def build_model(self) -> keras.Model:
        """Returns the model to train. Required."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_model().")

    def build_optimizer(self) -> keras.optimizers.Optimizer:
        """Returns the optimizer; by default `options.optimizer` at `options.learning_rate`."""
        return make_optimizer(self.options.optimizer, self.options.learning_rate)

    def train_arrays(self) -> Any | None:
        """Returns the training data as in-memory arrays, e.g. `(x, y)`, or None (the default).

        When given, batches are drawn inside the train loop (a seeded reshuffle per epoch),
        which lets the whole multi-step loop run as one XLA computation: the fast path for data
        that fits in memory. `train_dataset` then need not be implemented.
        """
        return None

    def train_dataset(self) -> tf.data.Dataset:
        """Returns batches of `(features, labels)` of `options.batch_size`, repeated.

        Required unless `train_arrays` is given; by default, `train_arrays`' batches.
        """
        arrays = self.train_arrays()
        if arrays is None:
            raise NotImplementedError(
                f"{type(self).__name__} must implement train_dataset() or train_arrays()."
            )
        return InMemoryBatches(arrays, self.options.batch_size, self.options.seed).dataset()

    def eval_dataset(self) -> tf.data.Dataset | None:
        """Returns a finite dataset of `(features, labels)` batches, or None for no evaluation."""
        return None

    def compute_loss(self, labels: Any, outputs: Any) -> tf.Tensor:
        """Returns the per-example losses, shape `[batch]`. Required."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss().")

    def build_metrics(self) -> dict[str, keras.metrics.Metric]:
        """Returns eval metrics by name, updated with `(labels, outputs)`; none by default."""
        return {}

    # ---- building ----------------------------------------------------------------------

    @property
    def model(self) -> keras.Model:
        """The model, built (with its penalties resolved) on first access."""
        if self._model is None:
            self.build()
        return self._model

    def build(self) -> None:
        """Seeds, builds the model, optimizer and metrics, and resolves every penalty's variables.

        Raises:
          ConfigError: a penalty's selection is empty or its regex matches nothing.
        """
        if self._model is not None:
            return
        if self.options.deterministic:
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(self.options.seed)
        with self.strategy.scope():
            model = self._build_model_with_policy()
            self._trainable = list(model.trainable_variables)
            self._selections = [(p, p.select(self._trainable)) for p in self.penalties]
            self.optimizer = self._build_optimizer_with_loss_scale()
            self.optimizer.build(self._trainable)  # before the first step: needed under strategies
            self._initial_lr = self._initial_learning_rate()
        self._loss_penalties = [(p, v) for p, v in self._selections if p.has_loss]
        self._decoupled = [(p, v) for p, v in self._selections if p.has_update]
        names = [p.name for p in self.penalties]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(
                f"Two penalties are named {duplicates[0]!r}; pass name=... to tell them apart."
            )
        self._loss_scaled = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        # Evaluation runs outside the replicas (cross-replica context), with plain metrics.
        self.metrics = self.build_metrics()
        self._model = model
        self.loss_names = (
            ["loss", "data_loss"]
            + [f"penalty/{p.name}" for p, _ in self._loss_penalties]
            + (["keras_regularizers"] if model.losses else [])
        )
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self._summary_tags = summaries.step_tags(self.loss_names, self._selections)
        self._writer = None
        self._writer_dir = None
        self._batches: InMemoryBatches | None = None
        self._make_train_loop(xla_loop=False)
        self._eval_step = self._maybe_function(self._evaluate_batch)
        logging.info(
            "%s on %s with %d replica(s); penalty coverage:\n%s",
            type(self).__name__,
            type(self.strategy).__name__,
            self.strategy.num_replicas_in_sync,
            self.penalty_table(),
        )

    @property
    def is_chief(self) -> bool:
        """Whether this process writes results, summaries and exports."""
        return is_chief(self.strategy)

    def _state_variables(self) -> list[Any]:
        return [*self.model.variables, *self.optimizer.variables, self._step]

    def get_state(self) -> list[Any]:
        """The values of every model and optimizer variable and the step (for `set_state`)."""
        return [v.numpy() for v in self._state_variables()]

    def set_state(self, values: list[Any]) -> None:
        """Returns model, optimizer and step to values from `get_state`, without retracing."""
        for variable, value in zip(self._state_variables(), values, strict=True):
            variable.assign(value)
        self.step = int(self._step.numpy())

    def _build_model_with_policy(self) -> keras.Model:
        policy = self.options.mixed_precision
        previous = keras.mixed_precision.global_policy()
        if policy:
            keras.mixed_precision.set_global_policy(policy)
        try:
            model = self.build_model()
            if not model.built or not model.trainable_variables:
                self._build_from_dataset(model)
        finally:
            keras.mixed_precision.set_global_policy(previous)
        return model

    def _build_optimizer_with_loss_scale(self) -> keras.optimizers.Optimizer:
        optimizer = self.build_optimizer()
        if self.options.mixed_precision == "mixed_float16" and not isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer
        ):
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        return optimizer

    def _build_from_dataset(self, model: keras.Model) -> None:
        spec = self.train_dataset().element_spec[0]
        model(tf.nest.map_structure(lambda s: tf.zeros([d or 1 for d in s.shape], s.dtype), spec))

    def _maybe_function(self, fn):
        return tf.function(fn) if self.options.use_tf_function else fn

    def _make_train_loop(self, xla_loop: bool) -> None:
        """(Re)makes the loop functions; the step is its own tf.function, traced once.

        The loop is re-made for each TensorBoard writer (a writer is captured when a function
        is traced, e.g. one per sweep run) and when XLA is turned on or off for it.
        """
        eager = not self.options.use_tf_function
        if not hasattr(self, "_replica_step"):
            jit_step = self.options.jit_compile is True
            self._replica_step = (
                self.train_step if eager else tf.function(self.train_step, jit_compile=jit_step)
            )
        self._xla_loop = xla_loop and not eager
        self._run_steps = (
            tf.function(self._steps, jit_compile=True) if self._xla_loop else self._steps
        )
        self._train_loop = self._maybe_function(self._train_steps)

    def penalty_table(self) -> str:
        """Which penalties cover each trainable variable, and which variables none cover."""
        self.model  # noqa: B018 -- resolves the selections
        return coverage_table(self._trainable, self._selections)

    # ---- the step ----------------------------------------------------------------------

    def _initial_learning_rate(self) -> tf.Tensor:
        """The learning rate at step 0: the base of the paper's schedule multiplier η_t."""
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        lr = optimizer._learning_rate  # the schedule or the variable, before evaluation
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            lr = lr(0)
        return tf.cast(tf.convert_to_tensor(lr), tf.float32)

    def compute_losses(self, features: Any, labels: Any, training: bool = True) -> list[tf.Tensor]:
        """The loss breakdown in `loss_names` order: total, data loss, each penalty term.

        Call it under a `GradientTape`: the total is what gradients are taken of.
        """
        outputs = _float32(self.model(features, training=training))
        per_example = tf.cast(self.compute_loss(labels, outputs), tf.float32)
        if per_example.shape.rank != 1:
            raise ValueError(
                f"{type(self).__name__}.compute_loss must return per-example losses of shape "
                f"[batch], got shape {per_example.shape}."
            )
        data_loss = tf.nn.compute_average_loss(per_example)
        terms = [p.loss(v) for p, v in self._loss_penalties]
        if self.model.losses:
            terms.append(tf.add_n([tf.cast(x, tf.float32) for x in self.model.losses]))
        penalty = tf.add_n(terms) if terms else tf.constant(0.0)
        total = data_loss + tf.nn.scale_regularization_loss(penalty)
        return [total, data_loss, *terms]

    def train_step(self, batch: Any) -> list[tf.Tensor]:
        """One optimizer step on `batch`; returns the loss breakdown."""
        features, labels = batch
        with tf.GradientTape() as tape:
            losses = self.compute_losses(features, labels)
            loss = self.optimizer.scale_loss(losses[0]) if self._loss_scaled else losses[0]
        gradients = tape.gradient(loss, self._trainable)
        if self._decoupled:
            self._apply_decoupled_updates(gradients)
        self.optimizer.apply_gradients(zip(gradients, self._trainable))
        return losses

    def _apply_decoupled_updates(self, gradients: list[tf.Tensor]) -> None:
        """Decoupled penalties' direct updates, at this step's learning rate (before it moves).

        Runs once per step in cross-replica context (`merge_call`), so mirrored variables get
        one identical update.
        """
        lr = tf.cast(self.optimizer.learning_rate, tf.float32)
        replica = tf.distribute.get_replica_context()
        nonfinite = tf.constant(0.0)  # replicas whose gradients are not finite
        if self._loss_scaled:
            # A LossScaleOptimizer skips steps whose gradients are not finite; so must the decay.
            local = tf.reduce_all(
                [tf.reduce_all(tf.math.is_finite(g)) for g in gradients if g is not None]
            )
            local = tf.cast(tf.logical_not(local), tf.float32)
            nonfinite = replica.all_reduce(tf.distribute.ReduceOp.SUM, local)
        replica.merge_call(self._decoupled_update_fn, args=(lr, nonfinite))

    def _decoupled_update_fn(self, strategy, lr, nonfinite) -> None:
        lr = strategy.experimental_local_results(lr)[0]
        nonfinite = strategy.experimental_local_results(nonfinite)[0]
        context = StepContext(learning_rate=lr, schedule_multiplier=lr / self._initial_lr)

        def update() -> tf.Tensor:
            for penalty, variables in self._decoupled:
                penalty.update(variables, context)
            return tf.constant(True)

        if self._loss_scaled:
            tf.cond(nonfinite == 0, update, lambda: tf.constant(False))
        else:
            update()

    def _train_steps(self, iterator: Any, num_steps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """`num_steps` steps, then the TensorBoard rows they recorded (outside XLA).

        Returns the loop's mean loss breakdown and the step: one read-back per loop.
        """
        sums, done, rows, row_steps, count = self._run_steps(iterator, num_steps)
        if self._writer is not None:
            with self._writer.as_default():
                summaries.write_rows(self._summary_tags, rows, row_steps, count)
        means = sums / tf.maximum(tf.cast(done, tf.float32), 1.0)
        return means, self._step.read_value()

    def _steps(self, iterator: Any, num_steps: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """The multi-step loop: batches from `iterator`, or in-graph from the in-memory data.

        The loss sums and the step are carried through the loop, the step written to its
        variable once at the end (per-step variable updates cost ~2% of a small model's step
        inside XLA). Returns `(loss sums, steps done, rows, steps, count)`: the sums of the
        loss breakdown, and the summary rows recorded every `summary_every` steps.
        """
        every = self.options.summary_every
        capacity = self.options.steps_per_loop // every + 1 if every else 1
        record = self._writer is not None
        start = self._step.read_value()
        in_memory = iterator is None
        cached = not self._xla_loop  # see InMemoryBatches.indices
        # In memory, each step computes the next step's example indices and carries them
        # (the last step's go unused): computed next to their gather, XLA fused the order's
        # hash into it, per element.
        indices = self._batches.indices(start, cached) if in_memory else tf.zeros([0], tf.int32)

        def body(i, finite, sums, indices, rows, row_steps, count):
            step = start + tf.cast(i, tf.int64)  # 0-based: the steps done before this one
            if in_memory:
                batch = self._batches.gather(indices)
                indices = self._batches.indices(step + 1, cached)
            else:
                batch = next(iterator)
            per_replica = self.strategy.run(self._replica_step, args=(batch,))
            losses = tf.stack(self._reduce_losses(per_replica))
            if record:
                rows, row_steps, count = tf.cond(
                    (step + 1) % every == 0,
                    lambda: self._record(losses, step + 1, rows, row_steps, count),
                    lambda: (rows, row_steps, count),
                )
            finite = tf.reduce_all(tf.math.is_finite(losses))
            return i + 1, finite, sums + losses, indices, rows, row_steps, count

        # An explicit while_loop, not autograph's `for ... in tf.range`: under XLA on CPU the
        # latter ran 4x slower. A non-finite loss ends the loop (`train` names the term).
        done, _, sums, _, rows, row_steps, count = tf.while_loop(
            lambda i, finite, *_: tf.logical_and(i < num_steps, finite),
            body,
            [
                tf.constant(0),
                tf.constant(True),
                tf.zeros([len(self.loss_names)]),
                indices,
                tf.zeros([capacity, len(self._summary_tags)]),
                tf.zeros([capacity], tf.int64),
                tf.constant(0),
            ],
        )
        self._step.assign_add(tf.cast(done, tf.int64))
        return sums, done, rows, row_steps, count

    def _record(self, losses, step, rows, row_steps, count) -> tuple[tf.Tensor, ...]:
        """Adds this step's TensorBoard values as row `count`."""
        values = summaries.step_values(
            losses,
            tf.cast(self.optimizer.learning_rate, tf.float32),
            self._initial_lr,
            self._selections,
        )
        rows = tf.tensor_scatter_nd_update(rows, [[count]], values[tf.newaxis])
        row_steps = tf.tensor_scatter_nd_update(row_steps, [[count]], [step])
        return rows, row_steps, count + 1

    def _reduce_losses(self, per_replica: list[Any]) -> list[tf.Tensor]:
        """Global values: total and data loss summed over replicas (each holds its share of
        the global mean), penalty terms averaged (each replica holds the whole term)."""
        total, data, *terms = per_replica
        sum_, mean = tf.distribute.ReduceOp.SUM, tf.distribute.ReduceOp.MEAN
        return [
            self.strategy.reduce(sum_, total, axis=None),
            self.strategy.reduce(sum_, data, axis=None),
            *(self.strategy.reduce(mean, t, axis=None) for t in terms),
        ]

    def _evaluate_batch(self, batch: Any) -> tf.Tensor:
        features, labels = batch
        outputs = _float32(self.model(features, training=False))
        for metric in self.metrics.values():
            metric.update_state(labels, outputs)
        per_example = tf.cast(self.compute_loss(labels, outputs), tf.float32)
        return tf.stack([tf.reduce_sum(per_example), tf.cast(tf.size(per_example), tf.float32)])

    # ---- the loop ----------------------------------------------------------------------

    def evaluate(self, dataset: tf.data.Dataset | None = None) -> dict[str, float]:
        """Data loss (mean per example) and metrics over `dataset` (default `eval_dataset()`)."""
        self.model  # noqa: B018
        dataset = dataset if dataset is not None else self.eval_dataset()
        if dataset is None:
            return {}
        for metric in self.metrics.values():
            metric.reset_state()
        total = tf.zeros([2])
        for batch in dataset:
            total += self._eval_step(batch)
        loss_sum, count = total.numpy()
        results = {"loss": float(loss_sum / max(count, 1.0))}
        results.update({k: float(m.result()) for k, m in self.metrics.items()})
        return results

    def distribute(self, dataset: tf.data.Dataset) -> Any:
        """`dataset` (global batches) split across the strategy's replicas."""
        if is_default(self.strategy):
            return dataset
        return self.strategy.experimental_distribute_dataset(dataset)

    def train(self) -> dict[str, Any]:
        """Trains to `options.train_steps`, resuming from `model_dir`'s checkpoint if any.

        Evaluates as `options.eval_every` says, checkpoints as `options.checkpoint_every`
        says, and on SIGTERM saves and raises `Preempted`. A run already at `train_steps` is
        evaluated, not retrained.

        Returns:
          `{"step", "steps_per_sec" (after the first loop), "first_loop_sec" (tracing and
          compiling included), "train": {loss breakdown, mean of the last loop},
          "eval": {metrics at the end}, "history": [eval results by step]}`.

        Raises:
          FloatingPointError: a loss term or weight became non-finite (the message names the
            step and the term); nothing non-finite is saved.
          Preempted: SIGTERM arrived; a checkpoint was saved.
          ConfigError: `model_dir` is unwritable, or holds another task's or model's run.
        """
        opts = self.options
        model_dir = self._prepare_model_dir()
        self.model  # noqa: B018
        checkpointer = self._checkpointer(model_dir) if model_dir else None
        iterator = self._make_input(checkpointer)
        if checkpointer and checkpointer.restore(opts.resume_from):
            self.step = int(self._step.numpy())
        if iterator == "distributed":
            iterator = iter(self.distribute(self.train_dataset().skip(self.step)))
        if self.step >= opts.train_steps:
            logging.info("Already at step %d of %d: not training.", self.step, opts.train_steps)
        self._use_writer(model_dir)
        try:
            with _sigterm_flag() as preempted:
                result = self._train_loops(iterator, checkpointer, preempted)
        finally:
            if self._writer is not None:
                self._writer.flush()
        if checkpointer:
            checkpointer.close()
        if opts.export_dir and self.is_chief:
            self.model.export(opts.export_dir, verbose=False)
        if model_dir and self.is_chief:
            with open(os.path.join(model_dir, "results.json"), "w") as f:
                json.dump(result, f, indent=2)
        return result

    def _make_input(self, checkpointer: Checkpointer | None) -> Any:
        """The training input: None for in-graph in-memory batches (the step picks them), an
        iterator (checkpointed), or "distributed" (rebuilt past the restored step: a
        distributed iterator cannot be checkpointed)."""
        if self._batches is not None:  # loaded by an earlier train() call
            return None
        arrays = self.train_arrays() if is_default(self.strategy) else None
        if arrays is not None:
            self._batches = InMemoryBatches(arrays, self.options.batch_size, self.options.seed)
            self._make_train_loop(xla_loop=self._auto_xla())
            return None
        if not is_default(self.strategy):
            return "distributed"
        iterator = iter(self.train_dataset())
        if checkpointer:
            checkpointer.track("iterator", iterator)
        return iterator

    def _auto_xla(self) -> bool:
        """Whether to compile the in-memory loop with XLA: `jit_compile`, or if None, yes
        unless the model has convolutions and there is no GPU (XLA:CPU's convolutions were
        13-24x slower than TensorFlow's oneDNN ones here; its dense layers ~1.6x faster)."""
        if self.options.jit_compile is not None:
            return self.options.jit_compile
        if tf.config.list_logical_devices("GPU"):
            return True
        convolutions = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
        layers = self.model._flatten_layers(include_self=False, recursive=True)
        return not any(isinstance(layer, convolutions) for layer in layers)

    def _run_train_loop(self, iterator: Any, num_steps: int) -> dict[str, float]:
        """One loop call: its mean loss breakdown (and `self.step` updated).

        If XLA was chosen automatically and cannot compile the loop, runs without XLA.
        """
        try:
            means, step = self._train_loop(iterator, tf.constant(num_steps, tf.int32))
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
            if not (self._xla_loop and self.options.jit_compile is None):
                raise
            logging.warning("XLA could not compile the train loop; running without it: %s",
                            str(e).strip().splitlines()[0][:300])  # fmt: skip
            self._make_train_loop(xla_loop=False)
            means, step = self._train_loop(iterator, tf.constant(num_steps, tf.int32))
        self.step = int(step)
        return {name: float(v) for name, v in zip(self.loss_names, means.numpy())}

    def _use_writer(self, model_dir: str | None) -> None:
        """Points TensorBoard summaries at `model_dir`: none without it, off the chief, or
        with `summary_every=0`. A new writer needs a new trace of the loop (not of the step)."""
        wanted = model_dir if model_dir and self.is_chief else None
        if not self.options.summary_every or wanted == self._writer_dir:
            return
        if self._writer is not None:
            self._writer.close()
        self._writer_dir = wanted
        self._writer = tf.summary.create_file_writer(wanted) if wanted else None
        if self._writer is not None:
            summaries.write_text(self._writer, "penalties", self.penalty_table(), self.step)
        self._make_train_loop(xla_loop=self._xla_loop)

    def _checkpointer(self, model_dir: str) -> Checkpointer:
        objects = {
            "optimizer_variables": list(self.optimizer.variables),
            "step": self._step,
            "penalty_strengths": [v for p in self.penalties for v in p.state_variables()],
        }
        return Checkpointer(
            model_dir,
            task=self.registered_name or type(self).__name__,
            model_variables=list(self.model.variables),
            objects=objects,
            chief=self.is_chief,
        )

    def _next_stop(self) -> int:
        """The step the next loop ends at: cut short at eval and checkpoint boundaries."""
        opts = self.options
        stop = min(self.step + opts.steps_per_loop, opts.train_steps)
        for every in (opts.eval_every, opts.checkpoint_every if opts.model_dir else 0):
            if every:
                stop = min(stop, (self.step // every + 1) * every)
        return stop

    def _train_loops(self, iterator: Any, checkpointer: Checkpointer | None, preempted) -> dict:
        opts = self.options
        train_logs: dict[str, float] = {}
        eval_logs: dict[str, float] = {}
        history = []
        progress = Progress(opts.train_steps)
        start, start_step = time.perf_counter(), self.step
        first_loop_sec, first_loop_steps = 0.0, 0
        while self.step < opts.train_steps:
            loop_start, loop_first = time.perf_counter(), self.step
            train_logs = self._run_train_loop(iterator, self._next_stop() - self.step)
            self._check_finite(train_logs)
            rate = (self.step - loop_first) / (time.perf_counter() - loop_start)
            if not first_loop_steps:  # includes tracing and compiling
                first_loop_sec, first_loop_steps = (
                    time.perf_counter() - start,
                    self.step - loop_first,
                )
            progress.update(self.step, rate, train_logs)
            self._write_scalars({"steps_per_sec": rate})
            done = self.step >= opts.train_steps
            if checkpointer and (
                done
                or preempted.is_set()
                or (opts.checkpoint_every and self.step % opts.checkpoint_every == 0)
            ):
                path = checkpointer.save(self.step)
                if preempted.is_set() and not done:
                    raise Preempted(self.step, path)
            if done or (opts.eval_every and self.step % opts.eval_every == 0):
                eval_logs = self.evaluate()
                if eval_logs:
                    history.append({"step": self.step, **eval_logs})
                    progress.message(f"eval at step {self.step}  {format_losses(eval_logs)}")
                    self._write_scalars({f"eval/{k}": v for k, v in eval_logs.items()})
        progress.close()
        if not eval_logs and self.step >= opts.train_steps:
            eval_logs = self.evaluate()
        # The rate after the first loop, whose time (tracing, XLA compiling) is reported apart.
        elapsed = time.perf_counter() - start - first_loop_sec
        steady = self.step - start_step - first_loop_steps
        return {
            "step": self.step,
            "steps_per_sec": steady / elapsed if steady and elapsed > 0 else 0.0,
            "first_loop_sec": first_loop_sec,
            "train": train_logs,
            "eval": eval_logs,
            "history": history,
        }

    def _write_scalars(self, values: dict[str, float]) -> None:
        if self._writer is not None:
            summaries.write_scalars(self._writer, self.step, values)

    def _check_finite(self, logs: dict[str, float]) -> None:
        bad = [name for name, value in logs.items() if name != "loss" and not math.isfinite(value)]
        if bad or not math.isfinite(logs.get("loss", 0.0)):
            raise FloatingPointError(
                f"Non-finite loss at step {self.step}: "
                + ", ".join(f"{n}={logs[n]}" for n in (bad or ["loss"]))
                + "; the last checkpoint, if any, is from before it."
            )

    def _prepare_model_dir(self) -> str | None:
        model_dir = self.options.model_dir
        if not model_dir:
            return None
        try:
            os.makedirs(model_dir, exist_ok=True)
            probe = os.path.join(model_dir, ".write_test")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise ConfigError(f"`model_dir` ({model_dir!r}) is not writable: {e.strerror}.") from e
        return model_dir


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[threading.Event]:
    """An Event set on SIGTERM while the block runs; the previous handler is restored after.

    Outside the main thread (where Python cannot install handlers) the event is never set.
    """
    event = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: event.set())
    try:
        yield event
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _float32(outputs: Any) -> Any:
    """Float outputs in float32: under mixed precision the loss is computed in full precision."""
    return tf.nest.map_structure(
        lambda t: tf.cast(t, tf.float32) if t.dtype.is_floating else t, outputs
    )
