"""The in-graph multi-step loop: n train steps in one tf.function, XLA when it pays."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf
from absl import logging
from tensorflow.python.framework import config as tf_config  # no public determinism query

from trainer.distribution import is_default, local_devices, replica_jit_compile
from trainer.errors import ConfigError
from trainer.inputs import InMemoryBatches
from trainer.optimizers import initial_learning_rate
from trainer.options import TrainerOptions
from trainer.run import summaries
from trainer.step.schedules import StrengthSchedules

if TYPE_CHECKING:  # the Trainer module imports this one
    from trainer.step.trainer import Built

_CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def use_xla(jit_compile: bool | None, model: keras.Model) -> bool:
    """Whether to compile an in-memory loop with XLA: `jit_compile`, or if None, yes unless
    the model has convolutions and there is no GPU (XLA:CPU's convolutions were 13-24x
    slower than TensorFlow's oneDNN ones here; its dense layers ~1.6x faster)."""
    if jit_compile is not None:
        return jit_compile
    if tf.config.list_logical_devices("GPU"):
        return True
    layers = model._flatten_layers(include_self=False, recursive=True)
    return not any(isinstance(layer, _CONVOLUTIONS) for layer in layers)


class TrainLoop:
    """`num_steps` of a Trainer's `train_step` inside one `tf.function` call.

    The batches come from the task's `train_arrays`, gathered in-graph from the step number
    (with no strategy the whole loop may then be one XLA computation; under a mirrored
    strategy each replica gathers its contiguous slice of the step's global batch, see
    `_gathering`), or else from an iterator over `train_dataset` that the caller passes to
    `run`; each goes through the task's `preprocess` inside the step, per replica. The loop
    stops early at a non-finite loss. With a summary writer, TensorBoard rows recorded every
    `summary_every` steps are written after the (possibly XLA-compiled) loop, in the same call.

    The step is its own `tf.function`, traced once (under a strategy, XLA-compiled per
    replica on GPUs: `distribution.replica_jit_compile`); the loop around it is re-made for
    each new writer (a writer is captured when a function is traced) and when XLA is turned
    off (an automatic choice that fails to compile falls back, the loop's or the step's).

    Args:
      built: what `Trainer.build()` made: the model, optimizer, step and its stages.
      options: the `TrainerOptions`.
      strategy: the distribution strategy the step runs under.
      arrays: the task's `train_arrays()` (in-memory data), or None for an iterator.

    Raises:
      ConfigError: in memory, `batch_size` does not divide by the strategy's replicas.
    """

    def __init__(
        self,
        built: Built,
        options: TrainerOptions,
        strategy: tf.distribute.Strategy,
        arrays: Any = None,
    ):
        self.built, self.options, self.strategy = built, options, strategy
        # XLA per replica (GPUs) reads the arrays from a copy on the replica's own device.
        jit_replicas = replica_jit_compile(options.jit_compile, local_devices(strategy))
        self.batches = (
            None
            if arrays is None
            else InMemoryBatches(
                arrays,
                options.batch_size,
                options.seed,
                replicate_over=None if is_default(strategy) or not jit_replicas else strategy,
            )
        )
        replicas = strategy.num_replicas_in_sync
        if self.batches is not None and options.batch_size % replicas:
            raise ConfigError(
                f"`batch_size` ({options.batch_size}) must divide by the {replicas} replicas "
                "to split in-memory batches evenly."
            )
        self._eager = not options.use_tf_function
        self._step = built.replica_step
        if self.batches is not None and not is_default(strategy):
            self._step = self._gathering(self._step)  # takes the global batch's indices
        if not is_default(strategy):
            self._step = self._stacking(self._step)  # one reduction of the losses per step
        self._make_step(jit=jit_replicas)  # XLA per replica: on GPUs under a strategy
        self._initial_lr = initial_learning_rate(built.optimizer)
        self._tags = summaries.step_tags(built.loss_names, built.selections)
        self._tags += built.chain.summary_tags()  # grad_norm when clipping
        self.writer: tf.summary.SummaryWriter | None = None
        self._input_wait_s: float | None = None
        self._writer_dir: str | None = None
        # The most steps one call records summary rows for, which sizes the row buffer: no
        # loop runs past `train_steps`, however large `steps_per_loop` is.
        self._row_steps = min(options.steps_per_loop, options.train_steps)
        self._earlier_steps_traces = 0  # of the compiled steps' functions made before this one
        # Under a strategy only the step may be compiled (`_step_fn`), not the loop around
        # `strategy.run`.
        xla = is_default(strategy) and use_xla(options.jit_compile, built.model)
        self._make(xla=self.in_memory and xla)

    @property
    def in_memory(self) -> bool:
        """Whether batches are gathered in-graph from `train_arrays` (no iterator needed)."""
        return self.batches is not None

    @property
    def input_wait_s(self) -> float | None:
        """Seconds the last `run` waited for its iterator's batches (see `_timed_next`); None
        when `in_memory`, and under op determinism, which refuses TensorFlow's timestamps."""
        return self._input_wait_s

    @property
    def xla(self) -> bool:
        """Whether the whole loop is compiled with XLA (after a fallback, False)."""
        return self._xla

    def trace_counts(self) -> dict[str, int]:
        """How often the step and the loop were traced (0 when running eagerly), and the
        XLA-compiled steps of an in-memory loop, summed over the functions made for them (0
        without XLA: the steps are then traced within the loop)."""
        return {
            "step": _traces(self._step_fn),
            "loop": _traces(self._loop_fn),
            "steps": self._earlier_steps_traces + _traces(self._steps_fn),
        }

    def concrete_function(self, iterator: Any = None) -> Any:
        """The loop traced for `iterator` (None when `in_memory`), to inspect its graph."""
        return self._loop_fn.get_concrete_function(iterator, tf.constant(1, tf.int32))

    def set_summary_dir(self, directory: str | None) -> bool:
        """Writes TensorBoard scalars to `directory` (None: none); True if a writer was made."""
        if not self.options.summary_every or directory == self._writer_dir:
            return False
        recording = self.writer is not None
        if recording:
            self.writer.close()
        self._writer_dir = directory
        self.writer = tf.summary.create_file_writer(directory) if directory else None
        if recording and self.writer is not None and not self._eager:
            # Another directory (a sweep's next run): only the outer function, which captures
            # the writer, is made again; the steps (under XLA, compiled) are the same.
            self._loop_fn = tf.function(self._loop)
        else:
            self._make(xla=self._xla)
        return self.writer is not None

    def run(self, num_steps: int, iterator: Any = None) -> tuple[dict[str, float], int]:
        """Runs `num_steps` steps (fewer if a loss becomes non-finite).

        Args:
          num_steps: steps to run, ≥ 1.
          iterator: the batches, unless `in_memory`.

        Returns:
          The mean loss breakdown over the steps run (by `built.loss_names`), then
          `train/<metric>` for each of `built.train_metrics` (streamed over this call's
          steps), and the step reached. If XLA was chosen automatically and cannot compile
          the loop, it is run again without XLA, with a warning. With a writer, a call longer
          than `min(steps_per_loop, train_steps)` (the options changed) retraces the loop
          with a larger summary buffer.
        """
        if self.writer is not None and num_steps > self._row_steps:  # options changed since
            self._row_steps = num_steps
            self._make(xla=self._xla)
        if self._timed and tf_config.is_op_determinism_enabled():  # by another Trainer since
            self._make(xla=self._xla)
        steps = tf.constant(num_steps, tf.int32)
        try:
            means, step, wait, *metrics = self._loop_fn(iterator, steps)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
            if not ((self._xla or self._replica_xla) and self.options.jit_compile is None):
                raise
            logging.warning(
                "XLA could not compile the train %s; running without it: %s",
                "loop" if self._xla else "step of each replica",
                str(e).strip().splitlines()[0][:300],
            )
            if self._replica_xla:
                self._make_step(jit=False)
            self._make(xla=False)
            means, step, wait, *metrics = self._loop_fn(iterator, steps)
        self._input_wait_s = float(wait) if self._timed else None
        names = self.built.loss_names
        logs = {name: float(v) for name, v in zip(names, means.numpy())}
        logs.update((f"train/{k}", float(v)) for k, v in zip(self.built.train_metrics, metrics))
        return logs, int(step)

    def _make_step(self, jit: bool) -> None:
        """The per-replica step's function (`strategy.run` calls it), compiled if `jit`."""
        self._replica_xla = jit and not self._eager
        self._step_fn = self._step if self._eager else tf.function(self._step, jit_compile=jit)

    def _make(self, xla: bool) -> None:
        self._earlier_steps_traces += _traces(getattr(self, "_steps_fn", None))
        self._xla = xla and not self._eager
        self._timed = not self.in_memory and not tf_config.is_op_determinism_enabled()
        self._steps_fn = tf.function(self._steps, jit_compile=True) if self._xla else self._steps
        self._loop_fn = self._loop if self._eager else tf.function(self._loop)

    def _loop(self, iterator: Any, num_steps: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """The steps, then the TensorBoard rows they recorded (outside XLA); returns the mean
        loss breakdown, the step and the seconds waited for input, then the training metrics'
        results over these steps (reset first): one read-back per loop."""
        train_metrics = self.built.train_metrics.values()
        for metric in train_metrics:
            metric.reset_state()
        sums, done, wait, rows, row_steps, count = self._steps_fn(iterator, num_steps)
        if self.writer is not None:
            with self.writer.as_default():
                summaries.write_rows(self._tags, rows, row_steps, count)
        means = sums / tf.maximum(tf.cast(done, tf.float32), 1.0)
        results = [tf.cast(m.result(), tf.float32) for m in train_metrics]
        return means, self.built.step_counter.read_value(), wait, *results

    def _steps(self, iterator: Any, num_steps: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """The while_loop: batches from `iterator`, or in-graph from the in-memory data.

        The loss sums and the step are carried through the loop, the step written to its
        variable once at the end (per-step variable updates cost ~2% of a small model's step
        inside XLA). Returns `(loss sums, steps done, wait, rows, steps, count)`: the sums of
        the loss breakdown, the seconds spent in the iterator's `get_next` (see
        `_timed_next`), and the summary rows recorded every `summary_every` steps.
        """
        built = self.built
        every = self.options.summary_every
        record = self.writer is not None
        capacity = self._row_steps // every + 1 if record else 1  # else one unused row
        counter = built.step_counter
        start = counter.read_value()
        in_memory, timed = self.in_memory, self._timed
        replicas_gather = in_memory and not is_default(self.strategy)  # see `_gathering`
        cached = not self._xla  # see InMemoryBatches.indices
        # In memory, each step computes the next step's example indices and carries them
        # (the last step's go unused): computed next to their gather, XLA fused the order's
        # hash into it, per element.
        indices = self.batches.indices(start, cached) if in_memory else tf.zeros([0], tf.int32)

        def body(i, finite, sums, wait, indices, rows, row_steps, count):
            step = start + tf.cast(i, tf.int64)  # 0-based: the steps done before this one
            if in_memory:
                batch = indices if replicas_gather else self.batches.gather(indices)
                indices = self.batches.indices(step + 1, cached)
            elif timed:
                batch, waited = _timed_next(iterator, after=sums)
                wait += waited
            else:
                batch = next(iterator)
            per_replica = self.strategy.run(self._step_fn, args=(batch,))
            losses = self._reduce(per_replica)
            if record:
                rows, row_steps, count = tf.cond(
                    (step + 1) % every == 0,
                    lambda: self._record(losses, step + 1, rows, row_steps, count),
                    lambda: (rows, row_steps, count),
                )
            finite = tf.reduce_all(tf.math.is_finite(losses))
            return i + 1, finite, sums + losses, wait, indices, rows, row_steps, count

        # An explicit while_loop, not autograph's `for ... in tf.range`: under XLA on CPU the
        # latter ran 4x slower. A non-finite loss ends the loop (the controller names the term).
        done, _, sums, wait, _, rows, row_steps, count = tf.while_loop(
            lambda i, finite, *_: tf.logical_and(i < num_steps, finite),
            body,
            [
                tf.constant(0),
                tf.constant(True),
                tf.zeros([len(built.loss_names)]),
                tf.constant(0.0, tf.float64),
                indices,
                tf.zeros([capacity, len(self._tags)]),
                tf.zeros([capacity], tf.int64),
                tf.constant(0),
            ],
        )
        counter.assign_add(tf.cast(done, tf.int64))
        return sums, done, wait, rows, row_steps, count

    def _gathering(self, step: Any) -> Any:
        """`step` on this replica's slice of a global batch given by its example indices.

        Replica `r` of `R` takes `indices[r·B/R : (r+1)·B/R]` and gathers those examples on
        its own device, so the global batch is the one device's whatever `R` (replica ids are
        global under MultiWorkerMirroredStrategy; each worker holds all the arrays). One
        function with the step, as a `tf.function` inside `strategy.run` may not hold another
        that synchronizes replicas.
        """
        per_replica = self.options.batch_size // self.strategy.num_replicas_in_sync

        def gather_and_step(indices: tf.Tensor) -> list[tf.Tensor]:
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            start = tf.cast(replica, tf.int32) * per_replica
            mine = tf.slice(indices, tf.reshape(start, [1]), [per_replica])
            return step(self.batches.gather(mine))

        return gather_and_step

    def _record(self, losses, step, rows, row_steps, count) -> tuple[tf.Tensor, ...]:
        """Adds this step's TensorBoard values as row `count`."""
        schedules = self.built.chain.stage(StrengthSchedules)  # strengths as learning_rate
        with schedules.next_step() if schedules else contextlib.nullcontext():
            values = summaries.step_values(
                losses,
                tf.cast(self.built.optimizer.learning_rate, tf.float32),
                self._initial_lr,
                self.built.selections,
            )
        extra = self.built.chain.summary_values()
        values = tf.concat([values, tf.stack(extra)], axis=0) if extra else values
        rows = tf.tensor_scatter_nd_update(rows, [[count]], values[tf.newaxis])
        row_steps = tf.tensor_scatter_nd_update(row_steps, [[count]], [step])
        return rows, row_steps, count + 1

    def _stacking(self, step: Any) -> Any:
        """`step` returning its losses stacked, each replica's share of the global values:
        its total and data loss (shares of the global mean), its penalty terms divided by
        the replicas (each replica holds the whole term). One SUM over the replicas then
        gives them all (`_reduce`): one collective per step instead of one per value,
        which across workers costs a network round trip each."""
        replicas = self.strategy.num_replicas_in_sync

        def step_and_stack(batch: Any) -> tf.Tensor:
            total, data, *terms = step(batch)
            return tf.stack([total, data, *(t / replicas for t in terms)])

        return step_and_stack

    def _reduce(self, per_replica: Any) -> tf.Tensor:
        """The step's global loss values (`built.loss_names`): the one device's as they are,
        else the sum over replicas of their stacked shares (`_stacking`)."""
        if is_default(self.strategy):
            return tf.stack(per_replica)
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)


def _traces(fn: Any) -> int:
    """How often the `tf.function` `fn` was traced; 0 for a plain function (or None)."""
    count = getattr(fn, "experimental_get_tracing_count", None)
    return count() if count else 0


def _timed_next(iterator: Any, after: tf.Tensor) -> tuple[Any, tf.Tensor]:
    """The iterator's next batch, and the seconds its `get_next` blocked.

    Timestamps around `get_next`: the first after `after` (the previous step's losses, which
    a step returns once its updates are done), the second before anything uses the batch
    (else the executor may run the step's first ops ahead of it). Two timestamp ops per step,
    no measurable cost; the time includes `get_next`'s own dispatch, so with steps far under
    a millisecond a pipeline that keeps up still shows a share.
    """
    with tf.control_dependencies([after]):
        start = tf.timestamp()
    with tf.control_dependencies([start]):
        batch = next(iterator)
    with tf.control_dependencies(tf.nest.flatten(batch, expand_composites=True)):
        end = tf.timestamp()
    with tf.control_dependencies([end]):
        batch = tf.nest.map_structure(tf.identity, batch, expand_composites=True)
    return batch, end - start
