"""The in-memory fast path: in-graph batches, the whole loop under XLA, and what must not change;
the input-wait share of a tf.data input, and its warning."""

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from array_task import ArrayTask, mse, op_determinism, regression_data, small_model
from test_tensorboard import read_events

from trainer import L2, ConfigError, DecoupledWeightDecay, Trainer, TrainerOptions, read_to_memory
from trainer.distribution import make_strategy
from trainer.inputs import InMemoryBatches, InputWait


class ArraysTask(Trainer):
    """`small_model` on in-memory arrays through `train_arrays` (no `train_dataset`)."""

    def __init__(self, options, *, penalties=(), strategy=None, loss_fn=mse):
        super().__init__(options, penalties=penalties, strategy=strategy)
        self.x, self.y = regression_data(n=72)  # 4 batches of 16 per epoch, 8 left out
        self.loss_fn = loss_fn

    def build_model(self):
        return small_model()

    def train_arrays(self):
        return self.x, self.y

    def eval_dataset(self):
        return tf.data.Dataset.from_tensor_slices((self.x, self.y)).batch(24)

    def compute_loss(self, labels, outputs):
        return self.loss_fn(labels, outputs)


def options(**kwargs):
    defaults = {"batch_size": 16, "train_steps": 20, "steps_per_loop": 7, "optimizer": "adam",
                "learning_rate": 0.01}  # fmt: skip
    return TrainerOptions(**{**defaults, **kwargs})


PENALTIES = lambda: [L2(1e-3), DecoupledWeightDecay(0.1)]  # noqa: E731


class InMemoryBatchesTest(tf.test.TestCase):
    def batches(self, seed=3, steps=12):
        data = InMemoryBatches((np.arange(72), np.arange(72) * 10), batch_size=16, seed=seed)
        return data, [data.batch(tf.constant(t, tf.int64)) for t in range(steps)]

    def test_each_epoch_is_a_fresh_permutation(self):
        """4 batches per epoch hold 64 distinct examples; epochs differ; labels stay aligned."""
        data, batches = self.batches()
        self.assertEqual(data.steps_per_epoch, 4)
        epochs = [
            np.concatenate([b[0].numpy() for b in batches[e * 4 : e * 4 + 4]]) for e in range(3)
        ]
        for order in epochs:
            self.assertLen(set(order.tolist()), 64)
        self.assertFalse(np.array_equal(epochs[0], epochs[1]))
        for x, y in batches:
            np.testing.assert_array_equal(y.numpy(), x.numpy() * 10)

    def test_order_is_a_function_of_seed_and_step(self):
        _, a = self.batches(seed=3)
        _, b = self.batches(seed=3)
        _, c = self.batches(seed=4)
        for (xa, _), (xb, _) in zip(a, b):
            np.testing.assert_array_equal(xa, xb)
        self.assertFalse(all(np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c)))
        # Out of order (as after a restore) gives the same batch.
        data, _ = self.batches(seed=3)
        np.testing.assert_array_equal(data.batch(tf.constant(9, tf.int64))[0], a[9][0])

    def test_dataset_yields_the_same_batches(self):
        data, batches = self.batches()
        for (x, _), (dx, _) in zip(batches, data.dataset().take(12)):
            np.testing.assert_array_equal(x, dx)

    def test_permutation_is_a_bijection_and_the_same_everywhere(self):
        """Each epoch's order holds every index once, for sizes at, under and over powers of
        two; the order is the same computed eagerly, in a graph and under XLA, and a batch's
        indices are the same from the cached order and mapped directly."""
        for size in (1, 2, 3, 17, 64, 72, 1000, 1025):
            data = InMemoryBatches(np.arange(size), batch_size=1, seed=11)
            compiled = tf.function(data.permutation, jit_compile=True)
            graph = tf.function(data.permutation)
            for epoch in (0, 1, 5):
                epoch = tf.constant(epoch, tf.int64)
                order = data.permutation(epoch).numpy()
                np.testing.assert_array_equal(np.sort(order), np.arange(size))
                np.testing.assert_array_equal(compiled(epoch), order)
                np.testing.assert_array_equal(graph(epoch), order)
        data, _ = self.batches()
        direct = tf.function(lambda t: data.indices(t, cached=False), jit_compile=True)
        for t in range(13):
            t = tf.constant(t, tf.int64)
            np.testing.assert_array_equal(direct(t), data.indices(t, cached=True))

    def test_order_looks_random(self):
        """Over 200 epochs of 1,000 examples: where an example lands is uncorrelated with
        where it started (|mean r| < 4 standard errors) and fixed points are as rare as in
        a uniform shuffle (1/n)."""
        data = InMemoryBatches(np.arange(1000), batch_size=1, seed=0)
        correlations, fixed = [], []
        for epoch in range(200):
            order = data.permutation(tf.constant(epoch, tf.int64)).numpy()
            correlations.append(np.corrcoef(np.arange(1000), order)[0, 1])
            fixed.append(np.mean(order == np.arange(1000)))
        self.assertLess(abs(np.mean(correlations)), 4 * np.std(correlations) / np.sqrt(200))
        self.assertLess(np.std(correlations), 2 / np.sqrt(1000))  # a random shuffle: 1/√n
        self.assertBetween(np.mean(fixed), 0.5e-3, 2e-3)

    def test_too_few_examples(self):
        with self.assertRaisesRegex(ValueError, r"`batch_size` \(100\) exceeds the 72"):
            InMemoryBatches(np.zeros([72, 2]), batch_size=100, seed=0)


class ReadToMemoryTest(tf.test.TestCase):
    def read(self, dataset, **kwargs):
        task = ArraysTask(options(**kwargs))
        with self.assertLogs(logger="absl", level="INFO") as logs:
            arrays = read_to_memory(dataset, task)
        lines = [line for line in logs.output if "ArraysTask: " in line]
        self.assertLen(lines, 1)
        return arrays, lines[0]

    def test_data_that_fits_is_read_as_stored(self):
        """10,000 examples (more than one read chunk) of uint8 images and int64 labels come
        back as NumPy arrays of the same dtypes, in order; the log line gives the size."""
        images = np.random.RandomState(0).randint(0, 256, [10_000, 3, 2]).astype(np.uint8)
        labels = np.arange(10_000, dtype=np.int64)
        dataset = tf.data.Dataset.from_tensor_slices((images, labels))
        (read_images, read_labels), line = self.read(dataset)
        self.assertEqual(read_images.dtype, np.uint8)
        self.assertEqual(read_labels.dtype, np.int64)
        np.testing.assert_array_equal(read_images, images)
        np.testing.assert_array_equal(read_labels, labels)
        self.assertRegex(
            line,
            r"ArraysTask: 10000 examples, 0.1 MB as stored \(uint8, int64\), in memory "
            r"\(≤ 25% of [\d.]+ GiB RAM \(in_memory_fraction\)\): batches gathered in-graph\.",
        )

    def test_too_large_or_unknown_size_is_left_to_tf_data(self):
        dataset = tf.data.Dataset.from_tensor_slices(np.zeros([100, 4], np.float32))
        arrays, line = self.read(dataset, in_memory_fraction=0.0)
        self.assertIsNone(arrays)
        self.assertRegex(
            line,
            r"ArraysTask: 100 examples, 0.0 MB as stored \(float32\), over 0% of [\d.]+ GiB RAM "
            r"\(in_memory_fraction\): batches from a tf.data pipeline\.",
        )
        arrays, line = self.read(dataset.filter(lambda x: x[0] >= 0))
        self.assertIsNone(arrays)
        self.assertIn("unknown size", line)

    def test_fraction_is_checked(self):
        for bad in (-0.1, 1.5, float("nan"), "0.5"):
            with self.assertRaisesRegex(ConfigError, "in_memory_fraction"):
                TrainerOptions(in_memory_fraction=bad)


class FastPathTest(parameterized.TestCase, tf.test.TestCase):
    def train(self, **kwargs):
        task = ArraysTask(options(**kwargs.pop("opts", {})), penalties=PENALTIES(), **kwargs)
        result = task.train()
        return task, result

    def test_xla_loop_matches_graph_and_eager(self):
        """Auto XLA over the whole loop ≡ the plain graph ≡ eager, to float32 rounding."""
        xla, _ = self.train()
        self.assertTrue(xla.train_loop.xla)
        plain, _ = self.train(opts={"jit_compile": False})
        self.assertFalse(plain.train_loop.xla)
        eager, _ = self.train(opts={"use_tf_function": False})
        for other in (plain, eager):
            for a, b in zip(xla.model.get_weights(), other.model.get_weights()):
                self.assertAllClose(a, b, atol=1e-5, rtol=0)

    def test_auto_xla_skips_convolutions_without_a_gpu(self):
        """Auto XLA: on for dense models; off for convolutional ones on CPU (13-24x slower)."""

        class ConvTask(ArraysTask):
            def build_model(self):
                layers = keras.layers
                return keras.Sequential(
                    [keras.Input((4, 4, 1)), layers.Conv2D(2, 3), layers.Flatten(), layers.Dense(2)]
                )

        on_gpu = bool(tf.config.list_logical_devices("GPU"))
        self.assertTrue(ArraysTask(options()).train_loop.xla)
        self.assertEqual(ConvTask(options()).train_loop.xla, on_gpu)
        self.assertTrue(ConvTask(options(jit_compile=True)).train_loop.xla)
        self.assertFalse(ArraysTask(options(jit_compile=False)).train_loop.xla)

    def test_falls_back_when_xla_cannot_compile(self):
        """A loss XLA cannot compile (a py_function): a warning, then the same training."""

        def opaque_mse(labels, outputs):
            return tf.py_function(lambda t: t, [mse(labels, outputs)], tf.float32)

        with self.assertLogs(logger="absl", level="WARNING") as logs:
            fallback, _ = self.train(loss_fn=lambda y, p: tf.reshape(opaque_mse(y, p), [-1]))
        self.assertIn("XLA could not compile the train loop", "\n".join(logs.output))
        self.assertFalse(fallback.train_loop.xla)
        plain, _ = self.train(opts={"jit_compile": False})
        for a, b in zip(fallback.model.get_weights(), plain.model.get_weights()):
            self.assertAllClose(a, b, atol=1e-6, rtol=1e-6)

    def test_resume_is_bit_identical(self):
        """20 steps, a fresh Trainer resuming to 30 ≡ 30 steps straight (deterministic)."""
        root = self.create_tempdir().full_path
        straight = {"train_steps": 30, "checkpoint_every": 10, "deterministic": True,
                    "model_dir": os.path.join(root, "straight")}  # fmt: skip
        reference, _ = self.train(opts=straight)
        broken = {**straight, "model_dir": os.path.join(root, "broken")}
        self.train(opts={**broken, "train_steps": 20})
        resumed, result = self.train(opts=broken)
        self.assertEqual(result.step, 30)
        for a, b in zip(resumed.model.get_weights(), reference.model.get_weights()):
            np.testing.assert_array_equal(a, b)

    def test_mirrored_strategy_uses_the_same_batches(self):
        """Under MirroredStrategy the arrays go through `dataset()`: same weights (≤ 1e-5)."""
        single, _ = self.train(opts={"jit_compile": False})
        mirrored, _ = self.train(
            opts={"jit_compile": False}, strategy=make_strategy("mirrored", cpu_replicas=2)
        )
        for a, b in zip(single.model.get_weights(), mirrored.model.get_weights()):
            self.assertAllClose(a, b, atol=1e-5, rtol=0)

    def test_preprocess_applies_to_every_batch(self):
        """Features stored ×4 with a `preprocess` that divides by 4 (exact in floats) train
        and evaluate exactly as the plain ones: in memory (XLA), through the default
        `train_dataset` under MirroredStrategy, and through a task's own tf.data pipeline."""

        def unscale(features, labels):
            return features / 4.0, labels

        class Scaled(ArraysTask):
            def __init__(self, options, **kwargs):
                super().__init__(options, **kwargs)
                self.x = self.x * 4.0

            def preprocess(self, features, labels):
                return unscale(features, labels)

        class ScaledArrayTask(ArrayTask):
            def preprocess(self, features, labels):
                return unscale(features, labels)

        mirrored = lambda: make_strategy("mirrored", cpu_replicas=2)  # noqa: E731
        x, y = regression_data(n=64)
        pairs = [
            (lambda: ArraysTask(options()), lambda: Scaled(options())),
            (lambda: ArraysTask(options(jit_compile=False), strategy=mirrored()),
             lambda: Scaled(options(jit_compile=False), strategy=mirrored())),
            (lambda: ArrayTask(x, y, options()), lambda: ScaledArrayTask(4 * x, y, options())),
        ]  # fmt: skip
        for plain_fn, scaled_fn in pairs:
            plain, scaled = plain_fn(), scaled_fn()
            plain.train()
            scaled.train()
            self.assertEqual(plain.train_loop.in_memory, scaled.train_loop.in_memory)
            for a, b in zip(plain.model.get_weights(), scaled.model.get_weights()):
                np.testing.assert_array_equal(a, b)
            self.assertEqual(plain.evaluate(), scaled.evaluate())

    def test_summaries_from_the_xla_loop(self):
        """Rows recorded inside the compiled loop, written right after it: same tags."""
        model_dir = self.create_tempdir().full_path
        task, result = self.train(opts={"model_dir": model_dir, "summary_every": 5})
        self.assertTrue(task.train_loop.xla)
        scalars, _, _ = read_events(model_dir)
        self.assertEqual([s for s, _ in scalars["loss/total"]], [5, 10, 15, 20])
        self.assertIn("decay/decoupled_weight_decay", scalars)
        total, data, l2 = (dict(scalars[t]) for t in ("loss/total", "loss/data", "loss/penalty/l2"))
        for step in total:
            self.assertAllClose(total[step], data[step] + l2[step], rtol=1e-6)
        self.assertAllClose(dict(scalars["eval/loss"])[20], result.eval["loss"])

    def test_keras_model_fit_is_not_disturbed(self):
        """The global state tapeloop touches (policy, seeds) leaves plain Keras working."""
        self.train()
        model = small_model()
        model.compile(optimizer="sgd", loss="mse")
        x, y = regression_data(n=32)
        history = model.fit(x, y, epochs=2, verbose=0)
        self.assertLess(history.history["loss"][1], history.history["loss"][0])
        self.assertEqual(keras.mixed_precision.global_policy().name, "float32")


class SlowPipelineTask(ArraysTask):
    """The same data through a tf.data pipeline that sleeps `delay` seconds per batch."""

    def __init__(self, options, *, delay):
        super().__init__(options)
        self.delay = delay

    def train_arrays(self):
        return None

    def train_dataset(self):
        def sleep(x, y):
            time.sleep(self.delay)
            return x, y

        x_shape = [self.options.batch_size, self.x.shape[1]]
        y_shape = [self.options.batch_size, self.y.shape[1]]

        batches = (
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
            .repeat()
            .batch(self.options.batch_size, drop_remainder=True)
            .map(lambda x, y: tf.py_function(sleep, [x, y], [tf.float32, tf.float32]))
            .map(lambda x, y: (tf.ensure_shape(x, x_shape), tf.ensure_shape(y, y_shape)))
            .prefetch(tf.data.AUTOTUNE)
        )
        # The py_function's state (none) need not be saved with the iterator's position.
        saving = tf.data.Options()
        saving.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
        return batches.with_options(saving)


class InputWaitTest(tf.test.TestCase):
    def train(self, task):
        with op_determinism(False), self.assertLogs(logger="absl", level="INFO") as logs:
            result = task.train()
        warnings = [line for line in logs.output if "Input-bound" in line]
        return result, warnings

    def test_a_slow_pipeline_is_reported_and_warned_about_once(self):
        """Batches that take 20 ms to make, steps of well under 1 ms: the loop waits for its
        input most of the time; one warning gives the share and the fixes; results.json and
        the TrainResult carry the share."""
        model_dir = self.create_tempdir().full_path
        task = SlowPipelineTask(
            options(train_steps=12, steps_per_loop=3, model_dir=model_dir), delay=0.02
        )
        result, warnings = self.train(task)
        self.assertFalse(task.train_loop.in_memory)
        self.assertGreater(result.input_wait_share, 0.5)
        self.assertLessEqual(result.input_wait_share, 1.0)
        self.assertLen(warnings, 1)
        self.assertIn(f"{100 * result.input_wait_share:.0f}% of its time", warnings[0])
        for fix in ("train_arrays()", "batch before map", "prefetch"):
            self.assertIn(fix, warnings[0])
        with open(os.path.join(model_dir, "results.json")) as f:
            self.assertEqual(json.load(f)["input_wait_share"], result.input_wait_share)
        # Per loop: at least the 3 sleeps' worth of waiting (the first batch may be ready).
        self.assertGreater(task.train_loop.input_wait_s, 2 * 0.02)

    def test_in_memory_input_has_no_share_and_no_warning(self):
        model_dir = self.create_tempdir().full_path
        task = ArraysTask(options(model_dir=model_dir))
        result, warnings = self.train(task)
        self.assertTrue(task.train_loop.in_memory)
        self.assertIsNone(task.train_loop.input_wait_s)
        self.assertIsNone(result.input_wait_share)
        self.assertEmpty(warnings)
        with open(os.path.join(model_dir, "results.json")) as f:
            self.assertIsNone(json.load(f)["input_wait_share"])

    def test_under_op_determinism_nothing_is_measured(self):
        """TensorFlow refuses timestamps under op determinism: the loop runs untimed."""
        task = SlowPipelineTask(options(train_steps=4, steps_per_loop=2), delay=0.0)
        with op_determinism(True):
            result = task.train()
        self.assertEqual(result.step, 4)
        self.assertIsNone(result.input_wait_share)

    def test_share_leaves_out_the_first_loop_and_warns_once(self):
        """The first loop (tracing) counts only when it is the only one; one warning, at
        `finish` unless `MEASURED_S` seconds of loops are counted before."""
        wait = InputWait()
        self.assertIsNone(wait.finish())
        wait.add(None, 1.0)  # in-memory loops are not counted
        self.assertIsNone(wait.share)
        wait.add(9.0, 10.0)  # the first loop
        self.assertEqual(wait.share, 0.9)
        with self.assertNoLogs(logger="absl", level="WARNING"):
            wait.add(1.0, 4.0)
            wait.add(0.0, 1.0)
        self.assertEqual(wait.share, 0.2)  # 1 s of 5: the first loop left out
        with self.assertLogs(logger="absl", level="WARNING") as logs:
            wait.add(4.0, 5.0)  # 5 s of 10 s: measured long enough to warn now
            self.assertEqual(wait.finish(), 0.5)
        self.assertLen(logs.output, 1)
        self.assertIn("50% of its time", logs.output[0])


if __name__ == "__main__":
    tf.test.main()
