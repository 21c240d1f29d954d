"""In-memory training data batched in-graph: a seeded reshuffle per epoch, chosen by the step."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from trainer.errors import ConfigError


class InMemoryBatches:
    """Batches of arrays held in variables, picked inside the train loop from the step number.

    Batch `t` is examples `perm_e[p·B : (p+1)·B]` of epoch `e = t // steps_per_epoch`,
    `p = t % steps_per_epoch`, where `perm_e` is a permutation drawn from `(seed, e)` alone
    (stateless), so the data order is a function of the step: nothing to checkpoint, and the
    whole multi-step loop, input included, can be compiled with XLA. The permutation is cached
    in a variable and redrawn when the epoch changes. The last partial batch of each epoch is
    dropped.

    Args:
      arrays: a nest of arrays (or tensors) with the same first dimension, e.g. `(x, y)`.
      batch_size: examples per batch.
      seed: the shuffle seed.

    Raises:
      ConfigError: the arrays' first dimensions differ, or hold fewer than `batch_size`
        examples.
    """

    def __init__(self, arrays: Any, batch_size: int, seed: int):
        self._numpy = tf.nest.map_structure(np.asarray, arrays)
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
        self.seed = seed
        self._perm = tf.Variable(tf.range(self.size, dtype=tf.int32), trainable=False)
        self._perm_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False)

    def permutation(self, epoch: tf.Tensor) -> tf.Tensor:
        """The example order of `epoch`: examples sorted by a hash of (index, seed, epoch).

        Integer arithmetic, not `tf.random`: stateless random ops draw other numbers under XLA
        (even with `alg="philox"`), and the order must not depend on whether XLA is on. The
        hash is a bijection on 32-bit values, so keys never tie.
        """
        xor = tf.bitwise.bitwise_xor
        salt = _mix(xor(_mix(tf.constant(self.seed % 2**32, tf.int64)), tf.cast(epoch, tf.int64)))
        keys = _mix(xor(tf.range(self.size, dtype=tf.int64), salt))
        return tf.cast(tf.argsort(keys), tf.int32)

    def batch(self, step: tf.Tensor) -> Any:
        """The batch for 0-based `step`."""
        step = tf.cast(step, tf.int64)
        epoch = step // self.steps_per_epoch
        if self._perm_epoch != epoch:
            self._perm.assign(self.permutation(epoch))
            self._perm_epoch.assign(epoch)
        start = tf.cast(step % self.steps_per_epoch, tf.int32) * self.batch_size
        # A gather, not a slice: XLA needs a slice's bounds at compile time, so `perm[start:...]`
        # (dynamic size) or `tf.slice` (begin from the step) recompiled the loop on every call.
        indices = tf.gather(self._perm, start + tf.range(self.batch_size))
        return tf.nest.map_structure(lambda a: tf.gather(a, indices), self.arrays)

    def dataset(self) -> tf.data.Dataset:
        """The same batches, in the same order, as a `tf.data.Dataset` (for strategies)."""
        arrays = tf.nest.map_structure(tf.constant, self._numpy)

        def epoch(index: tf.Tensor) -> tf.data.Dataset:
            order = tf.data.Dataset.from_tensor_slices(self.permutation(index))
            return order.batch(self.batch_size, drop_remainder=True)

        return (
            tf.data.Dataset.counter()
            .flat_map(epoch)
            .map(lambda indices: tf.nest.map_structure(lambda a: tf.gather(a, indices), arrays))
        )


_MASK32 = 0xFFFFFFFF


def _mix(x: tf.Tensor) -> tf.Tensor:
    """A 32-bit integer hash (a bijection) in int64 arithmetic that never overflows."""
    shift, xor, mask = tf.bitwise.right_shift, tf.bitwise.bitwise_xor, tf.bitwise.bitwise_and
    x = mask(x, _MASK32)
    for _ in range(2):
        x = mask(xor(shift(x, 16), x) * 0x45D9F3B, _MASK32)
    return xor(shift(x, 16), x)
