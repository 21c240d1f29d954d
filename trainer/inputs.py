"""Training input: data read to memory if it fits, batched in-graph by step; input waits."""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf
from absl import logging

from trainer.distribution import gathers_in_graph, is_default
from trainer.errors import ConfigError

if TYPE_CHECKING:  # the Trainer module imports this one
    from trainer.step.trainer import Trainer

_ROUNDS = 4  # Feistel rounds: 4 make a pseudo-random permutation (Luby & Rackoff)


class InMemoryBatches:
    """Batches of arrays held in variables, picked inside the train loop from the step number.

    Batch `t` is examples `perm_e[p·B : (p+1)·B]` of epoch `e = t // steps_per_epoch`,
    `p = t % steps_per_epoch`, where `perm_e` is a pseudo-random permutation keyed by
    `(seed, e)` alone (see `shuffle`), so the data order is a function of the step: nothing
    to checkpoint, and the whole multi-step loop, input included, can be compiled with XLA.
    The last partial batch of each epoch is dropped.

    Args:
      arrays: a nest of arrays (or tensors) with the same first dimension, e.g. `(x, y)`.
      batch_size: examples per batch.
      seed: the shuffle seed, in [0, 2**32); it lives in a variable read by the graph, so
        assigning `seed` (a sweep's next seed) changes the order without retracing.
      replicate_over: a strategy whose every replica device gets its own copy of the arrays
        (mirrored variables, made in its scope), which that replica's `gather` reads: an
        XLA-compiled step reads only variables on its own device. None (one copy, on the
        default device) when the replicas' steps are not compiled.

    Raises:
      ConfigError: the arrays' first dimensions differ, or hold fewer than `batch_size`
        examples.
    """

    def __init__(
        self,
        arrays: Any,
        batch_size: int,
        seed: int,
        replicate_over: tf.distribute.Strategy | None = None,
    ):
        self._numpy = tf.nest.map_structure(np.asarray, arrays)
        with replicate_over.scope() if replicate_over else contextlib.nullcontext():
            self.arrays = tf.nest.map_structure(
                lambda a: tf.Variable(a, trainable=False, name="train_data"), self._numpy
            )
        sizes = {int(v.shape[0]) for v in tf.nest.flatten(self.arrays)}
        if len(sizes) != 1:
            raise ConfigError(
                f"train_arrays() returned arrays of different lengths {sorted(sizes)}."
            )
        self.size = sizes.pop()
        if self.size < batch_size:
            raise ConfigError(
                f"`batch_size` ({batch_size}) exceeds the {self.size} training examples."
            )
        self.batch_size = batch_size
        self.steps_per_epoch = self.size // batch_size
        self._order = tf.Variable(tf.range(self.size, dtype=tf.int32), trainable=False)
        self._order_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False)
        self._seed = tf.Variable(seed % 2**32, dtype=tf.int64, trainable=False, name="seed")

    @property
    def seed(self) -> int:
        """The shuffle seed; set it to reorder the data without retracing the loop."""
        return int(self._seed.numpy())

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed.assign(value % 2**32)
        self._order_epoch.assign(-1)  # the cached order was the old seed's

    def shuffle(self, positions: tf.Tensor, epoch: tf.Tensor, seed: Any = None) -> tf.Tensor:
        """`perm_epoch[positions]`: the examples at `positions` (int, in [0, size)) of `epoch`
        (under `seed`, by default the `seed` variable's value when the graph runs).

        `perm_epoch` is a 4-round Feistel network on the `k`-bit integers (`2^k ≥ size`),
        its round keys hashed from `(seed, epoch, round)`, restricted to `[0, size)` by cycle
        walking (an image ≥ size is mapped again until it falls inside; as `2^k < 2·size`,
        an index needs fewer than 2 passes on average). Integer arithmetic, not
        `tf.random`: stateless random ops draw other numbers under XLA (even with
        `alg="philox"`), and the order must not depend on whether XLA is on.
        """
        bits = max(1, (self.size - 1).bit_length())
        xor, and_, or_ = tf.bitwise.bitwise_xor, tf.bitwise.bitwise_and, tf.bitwise.bitwise_or
        shr, shl = tf.bitwise.right_shift, tf.bitwise.left_shift

        def u32(value: Any) -> tf.Tensor:
            return tf.cast(value, tf.uint32)

        salt = _mix(xor(_mix(u32(self._seed if seed is None else seed)), u32(epoch)))
        keys = [_mix(xor(salt, u32(r + 1))) for r in range(_ROUNDS)]

        def feistel(x: tf.Tensor) -> tf.Tensor:
            high, low = bits // 2, bits - bits // 2  # widths of the two halves
            for key in keys:
                hi, lo = shr(x, u32(low)), and_(x, u32(2**low - 1))
                hi = xor(hi, and_(_mix(xor(lo, key)), u32(2**high - 1)))
                x = or_(shl(lo, u32(high)), hi)  # swap halves: lo on top
                high, low = low, high
            return x

        # 32-bit unsigned arithmetic: it vectorizes (64-bit products do not, on AVX2).
        x = feistel(u32(positions))
        if 2**bits != self.size:
            size = u32(self.size)
            x = tf.while_loop(
                lambda x: tf.reduce_any(x >= size),
                lambda x: [tf.where(x >= size, feistel(x), x)],
                [x],
            )[0]
        return tf.cast(x, tf.int32)

    def permutation(self, epoch: tf.Tensor) -> tf.Tensor:
        """The example order of `epoch`: `perm_epoch`, all `size` indices."""
        return self.shuffle(tf.range(self.size), epoch)

    def indices(self, step: tf.Tensor, cached: bool = True) -> tf.Tensor:
        """The example indices of batch `step` (0-based): `perm_e[p·B : (p+1)·B]`.

        Args:
          step: the step, a scalar integer tensor.
          cached: keep the epoch's order in a variable, recomputed when the epoch changes:
            the fewest ops per step where a graph runs op by op. False maps the batch's `B`
            positions through the permutation directly: no branch and no state, ~8x cheaper
            inside an XLA-compiled loop. Both give the same indices.
        """
        step = tf.cast(step, tf.int64)
        epoch = step // self.steps_per_epoch
        start = tf.cast(step % self.steps_per_epoch, tf.int32) * self.batch_size
        positions = start + tf.range(self.batch_size)
        if not cached:
            return self.shuffle(positions, epoch)
        if self._order_epoch != epoch:
            self._order.assign(self.permutation(epoch))
            self._order_epoch.assign(epoch)
        return tf.gather(self._order, positions)

    def gather(self, indices: tf.Tensor) -> Any:
        """The examples at `indices`, e.g. a batch's from `indices(step)`."""
        # Gathers, not slices: XLA needs a slice's bounds at compile time, so a slice starting
        # at the step recompiled the loop on every call.
        return tf.nest.map_structure(lambda a: tf.gather(a, indices), self.arrays)

    def batch(self, step: tf.Tensor, cached: bool = True) -> Any:
        """The batch for 0-based `step`: `gather(indices(step, cached))`."""
        return self.gather(self.indices(step, cached))

    def dataset(self) -> tf.data.Dataset:
        """The same batches, in the same order, as a `tf.data.Dataset` (for strategies)."""
        arrays = tf.nest.map_structure(tf.constant, self._numpy)
        seed = self.seed  # a constant: an iterator that reads a variable cannot be saved

        def epoch(index: tf.Tensor) -> tf.data.Dataset:
            order = tf.data.Dataset.from_tensor_slices(
                self.shuffle(tf.range(self.size), index, seed)
            )
            return order.batch(self.batch_size, drop_remainder=True)

        return (
            tf.data.Dataset.counter()
            .flat_map(epoch)
            .map(lambda indices: tf.nest.map_structure(lambda a: tf.gather(a, indices), arrays))
        )


def physical_memory() -> int:
    """This machine's physical RAM in bytes, from `os.sysconf`; 0 where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def read_to_memory(dataset: tf.data.Dataset, trainer: Trainer) -> Any | None:
    """`dataset`'s examples as NumPy arrays, as stored, if they fit in memory; else None.

    They fit when their size, known before reading (the element spec's bytes times the
    cardinality), is at most `options.in_memory_fraction` of the physical RAM. Logs one INFO
    line saying how training will get its batches, and why. Return the arrays from
    `train_arrays` and convert them (e.g. uint8 images to floats) in `Trainer.preprocess`.

    Args:
      dataset: a finite dataset of single examples (not batches) with fully defined shapes,
        e.g. a TFDS split.
      trainer: the `Trainer` whose options decide, named in the log line.

    Returns:
      A nest of arrays like `dataset.element_spec`, the examples along the first dimension;
      or None: too large or of unknown size, to be fed through a tf.data pipeline.
    """
    name = trainer.registered_name or type(trainer).__name__
    specs, count = tf.nest.flatten(dataset.element_spec), int(dataset.cardinality())
    if count < 0 or not all(_fixed_numeric(s) for s in specs):
        logging.info(
            "%s: training data of unknown size (cardinality %d, element spec %s): batches from "
            "a tf.data pipeline.",
            name,
            count,
            dataset.element_spec,
        )
        return None
    size = count * sum(s.shape.num_elements() * s.dtype.size for s in specs)
    fraction, ram = trainer.options.in_memory_fraction, physical_memory()
    what = f"{name}: {count} examples, {size / 1e6:.1f} MB as stored"
    what += f" ({', '.join(s.dtype.name for s in specs)})"
    budget = f"{100 * fraction:g}% of {ram / 2**30:.1f} GiB RAM (in_memory_fraction)"
    if size > fraction * ram:
        logging.info("%s, over %s: batches from a tf.data pipeline.", what, budget)
        return None
    how, strategy = "batches gathered in-graph", type(trainer.strategy).__name__
    if not gathers_in_graph(trainer.strategy):
        how = f"batches from tf.data over the arrays ({strategy})"
    elif not is_default(trainer.strategy):
        how += f", each replica its slice ({strategy})"
    logging.info("%s, in memory (≤ %s): %s.", what, budget, how)
    arrays = [np.empty([count, *s.shape], s.dtype.as_numpy_dtype) for s in specs]
    start = 0
    for chunk in dataset.batch(4096).prefetch(1).as_numpy_iterator():
        parts = tf.nest.flatten(chunk)
        for array, part in zip(arrays, parts, strict=True):
            array[start : start + len(part)] = part
        start += len(parts[0])
    if start != count:
        raise ConfigError(f"{name}: the dataset held {start} examples, not {count} as it said.")
    return tf.nest.pack_sequence_as(dataset.element_spec, arrays)


def _fixed_numeric(spec: Any) -> bool:
    """Whether `spec` is a tensor's of fully defined shape and a numeric (or bool) dtype."""
    return (
        isinstance(spec, tf.TensorSpec)
        and spec.shape.is_fully_defined()
        and (spec.dtype.is_integer or spec.dtype.is_floating or spec.dtype == tf.bool)
    )


class InputWait:
    """The share of the train loops' time spent waiting for batches from an iterator.

    Each loop over an iterator measures in-graph how long its `get_next` calls blocked
    (`TrainLoop.input_wait_s`); `add` sums those waits and the loops' wall times, leaving out
    the first loop (tracing, compiling) unless it is the only one. Above `WARN_ABOVE`, one
    warning names the share and the fix: during training once `MEASURED_S` seconds of loops
    are counted (fewer would be noise), else at `finish`.
    """

    WARN_ABOVE = 0.2
    MEASURED_S = 10.0

    def __init__(self):
        self._first: tuple[float, float] | None = None
        self._wait = self._wall = 0.0
        self._warned = False

    def add(self, wait_s: float | None, loop_s: float) -> None:
        """Counts one loop: `wait_s` (None for in-memory input) of its `loop_s` seconds."""
        if wait_s is None:
            return
        if self._first is None:
            self._first = (wait_s, loop_s)
            return
        self._wait += wait_s
        self._wall += loop_s
        if self._wall >= self.MEASURED_S:
            self._warn()

    @property
    def share(self) -> float | None:
        """Seconds waited over loop seconds, in [0, 1]; None without iterator input."""
        if self._first is None:
            return None
        wait, wall = (self._wait, self._wall) if self._wall > 0 else self._first
        return round(min(max(wait / wall, 0.0), 1.0), 4) if wall > 0 else 0.0

    def finish(self) -> float | None:
        """The share at the end of training, warned about if not yet."""
        self._warn()
        return self.share

    def _warn(self) -> None:
        share = self.share
        if self._warned or share is None or share <= self.WARN_ABOVE:
            return
        self._warned = True
        logging.warning(
            "Input-bound: the train loop waited for the next tf.data batch %.0f%% of its time. "
            "If the data fits in memory, return it from train_arrays(); otherwise batch before "
            "map, replace per-example work with batched ops and end the pipeline with prefetch.",
            100 * share,
        )


def _mix(x: tf.Tensor) -> tf.Tensor:
    """A 32-bit integer hash (a bijection on uint32; products wrap around)."""
    shift, xor = tf.bitwise.right_shift, tf.bitwise.bitwise_xor
    sixteen, multiplier = tf.constant(16, tf.uint32), tf.constant(0x45D9F3B, tf.uint32)
    for _ in range(2):
        x = xor(shift(x, sixteen), x) * multiplier
    return xor(shift(x, sixteen), x)


def per_replica_batches(dataset: tf.data.Dataset, input_context: Any) -> tf.data.Dataset:
    """This worker's per-replica batches, cut from `dataset`'s global batches.

    For `tf.distribute.Strategy.distribute_datasets_from_function`: worker `i` of `P` input
    pipelines takes the `i`-th contiguous `1/P` of each global batch and splits it into its
    replicas' contiguous slices, in replica order. Each step's global batch is thus the one a
    single device trains on, so 1, 2 or 4 replicas see the same examples per step, and skipping
    `k` global batches before this call resumes each worker exactly.

    Args:
      dataset: batches of a fixed global batch size (`drop_remainder=True`), a nest of tensors.
      input_context: a `tf.distribute.InputContext`.

    Returns:
      The worker's dataset of per-replica batches (`get_per_replica_batch_size` examples).

    Raises:
      ConfigError: the global batch size does not divide among the replicas.
    """
    pipelines = input_context.num_input_pipelines
    replicas = input_context.num_replicas_in_sync // pipelines  # this worker's
    global_size = tf.compat.dimension_value(tf.nest.flatten(dataset.element_spec)[0].shape[0])
    if global_size is None or global_size % input_context.num_replicas_in_sync:
        raise ConfigError(
            f"`batch_size` ({global_size}) must be a fixed multiple of the "
            f"{input_context.num_replicas_in_sync} replicas."
        )
    size = global_size // input_context.num_replicas_in_sync
    first = input_context.input_pipeline_id * replicas * size

    def split(*batch: Any) -> Any:
        batch = batch[0] if len(batch) == 1 else batch
        return tf.nest.map_structure(
            lambda t: tf.reshape(
                t[first : first + replicas * size], [replicas, size, *t.shape[1:]]
            ),
            batch,
        )

    return dataset.map(split).unbatch()


def accepts_input_context(method: Any) -> bool:
    """Whether `method` (a bound `train_dataset`) takes an `input_context` argument."""
    try:
        return "input_context" in inspect.signature(method).parameters
    except (TypeError, ValueError):  # a builtin or C callable: today's call, no context
        return False
