"""Workers start from the chief's state: when they cannot (the message), and the exact
packing of a broadcast's tensors. Two worker processes resuming from the chief's checkpoint:
`test_signals.WorkersTest`."""

import numpy as np
import tensorflow as tf

from trainer.distribution import make_strategy, pack_by_dtype, unpack_by_dtype
from trainer.run.agreement import disagreement, start_from_chief

NAMES = ["worker 0", "worker 1", "worker 2"]


class DisagreementTest(tf.test.TestCase):
    def test_other_steps_with_the_same_layout_take_the_chiefs(self):
        self.assertIsNone(
            disagreement(NAMES, [[250, 14, 900, 7], [0, 14, 900, 7], [3, 14, 900, 7]])
        )

    def test_other_layouts_name_the_chief_and_the_workers_that_differ_with_their_steps(self):
        rows = [[250, 14, 900, 7], [0, 14, 900, 7], [0, 12, 880, 5]]
        self.assertEqual(
            disagreement(NAMES, rows),
            "The workers' checkpointed state differs, so they cannot start from the chief's: "
            "worker 0 at step 250: 14 variables, 900 values; worker 2 at step 0: 12 "
            "variables, 880 values (the first is the chief). Run the same task, model and "
            "options on every worker.",
        )

    def test_the_same_counts_of_other_shapes_are_told_apart(self):
        message = disagreement(NAMES[:2], [[6, 4, 50, 7], [6, 4, 50, 8]])
        self.assertIn(
            "worker 1 at step 6: 4 variables, 50 values of other shapes or dtypes", message
        )


class BroadcastPackingTest(tf.test.TestCase):
    def test_tensors_come_back_bit_for_bit(self):
        """Packed into one vector per summed dtype and unpacked: the same bytes, -0.0, NaN,
        a subnormal, int64 beyond float64's integers and uint32's maximum included."""
        tensors = [
            tf.constant([-0.0, 1.5, np.nan], tf.float16),
            tf.constant(2**62 + 1, tf.int64),
            tf.constant([[3.3, -0.0]], tf.float64),
            tf.constant([True, False]),
            tf.constant([2**32 - 1, 7], tf.uint32),
            tf.constant(np.float32(1e-45)),
            tf.constant([1.1, -2.5], tf.bfloat16),
            tf.constant([[-3, 4]], tf.int32),
        ]
        flat, groups = pack_by_dtype(tensors)
        self.assertEqual([v.dtype for v in flat], [tf.float32, tf.int64, tf.float64])
        for before, after in zip(tensors, unpack_by_dtype(flat, groups, tensors), strict=True):
            self.assertEqual((after.dtype, after.shape), (before.dtype, before.shape))
            self.assertEqual(after.numpy().tobytes(), before.numpy().tobytes(), before.dtype)

    def test_one_process_keeps_its_own_state(self):
        step = tf.Variable(5, dtype=tf.int64)
        weights = tf.Variable([1.0, 2.0])
        chief_step = start_from_chief(make_strategy("default"), {"step": step, "w": [weights]}, 5)
        self.assertEqual(chief_step, 5)
        self.assertAllEqual(weights, [1.0, 2.0])


if __name__ == "__main__":
    tf.test.main()
