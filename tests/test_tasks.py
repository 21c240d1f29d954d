"""Tests for the built-in tasks: mnist and cifar10 on mocked TFDS data, offline failure, synthetic.

The TFDS tasks run their real loading code (`tasks.tfds_data.load`, `read_to_memory`, the
tf.data fallback's shuffles and batches, `preprocess`) under `tfds.testing.mock_data`, which
replaces only the stored records with deterministic random examples of the datasets' real
feature specs.
"""

import contextlib
import math
import os
import shutil
import socket
import tempfile
import time
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from array_task import op_determinism

from tasks import synthetic, tfds_data
from tasks.cifar10 import Cifar10
from tasks.mnist import Mnist
from trainer import ConfigError, TrainerOptions

tfds.disable_progress_bar()

NUM_EXAMPLES = 48
BATCH_SIZE = 16
TRAIN_STEPS = 6
STEPS_PER_LOOP = 3
NUM_CLASSES = 10


def _log_softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example sparse categorical cross-entropy of `logits`, in float64 NumPy."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels.astype(np.int64)]


class _TfdsTaskTest(tf.test.TestCase):
    """Shared checks for a TFDS task trained once per class under `tfds.testing.mock_data`."""

    task_cls = None
    feature_shape: tuple[int, ...] = ()  # what the model takes
    stored_shape: tuple[int, ...] = ()  # what TFDS stores, as uint8

    def scaled(self, images: np.ndarray) -> np.ndarray:
        """What the model takes for uint8 `images`, computed in NumPy: float32 k/255."""
        raise NotImplementedError("a subclass computes its reference")

    def old_map(self, image: tf.Tensor) -> tf.Tensor:
        """The per-example map the task's tf.data pipeline applied before `preprocess`."""
        raise NotImplementedError("a subclass gives it")

    def options(self, **kwargs) -> TrainerOptions:
        defaults = {"train_steps": TRAIN_STEPS, "batch_size": BATCH_SIZE,
                    "steps_per_loop": STEPS_PER_LOOP, "data_dir": self.data_dir}  # fmt: skip
        return TrainerOptions(**{**defaults, **kwargs})

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if cls.task_cls is None:
            raise NotImplementedError("a subclass sets task_cls")
        cls.data_dir = tempfile.mkdtemp(prefix=f"{cls.task_cls.dataset_name}_mock_")
        cls.addClassCleanup(shutil.rmtree, cls.data_dir, ignore_errors=True)
        # The mock stays active for the whole class: datasets are built lazily, by train(),
        # evaluate() and the checks below.
        stack = contextlib.ExitStack()
        cls.addClassCleanup(stack.close)
        stack.enter_context(tfds.testing.mock_data(num_examples=NUM_EXAMPLES))
        cls.trainer = cls.task_cls(
            TrainerOptions(
                train_steps=TRAIN_STEPS,
                batch_size=BATCH_SIZE,
                steps_per_loop=STEPS_PER_LOOP,
                data_dir=cls.data_dir,
            )
        )
        cls.result = cls.trainer.train()

    def test_train_reports_steps_and_finite_losses(self):
        """train() runs every step and reports finite train losses and one final eval."""
        self.assertEqual(self.result.step, TRAIN_STEPS)
        self.assertEqual(self.trainer.step, TRAIN_STEPS)
        self.assertIn("loss", self.result.train)
        for name, value in self.result.train.items():
            self.assertTrue(math.isfinite(value), f"train {name}={value}")
        self.assertLen(self.result.history, 1)
        self.assertEqual(self.result.history[0]["step"], TRAIN_STEPS)

    def test_eval_reports_accuracy_in_unit_interval_and_finite_loss(self):
        """The result's eval dict has accuracy in [0, 1] and a finite, non-negative loss."""
        eval_logs = self.result.eval
        self.assertContainsSubset({"loss", "accuracy"}, set(eval_logs))
        self.assertBetween(eval_logs["accuracy"], 0.0, 1.0)
        self.assertTrue(math.isfinite(eval_logs["loss"]))
        self.assertGreaterEqual(eval_logs["loss"], 0.0)

    def test_model_input_and_output_shapes(self):
        """The model maps a batch of the task's features to 10 logits per example."""
        model = self.trainer.model
        self.assertEqual(tuple(model.input_shape), (None, *self.feature_shape))
        self.assertEqual(tuple(model.output_shape), (None, NUM_CLASSES))
        outputs = model(tf.zeros([3, *self.feature_shape]))
        self.assertEqual(outputs.shape, (3, NUM_CLASSES))

    def test_in_memory_path_with_arrays_as_stored(self):
        """Mocked data fits in memory: uint8 images and int64 labels as TFDS stores them,
        batches gathered in-graph, and one INFO line saying so."""
        self.assertTrue(self.trainer.train_loop.in_memory)
        images, labels = self.trainer.train_arrays()
        self.assertEqual(images.dtype, np.uint8)
        self.assertEqual(images.shape, (NUM_EXAMPLES, *self.stored_shape))
        self.assertEqual(labels.dtype, np.int64)
        self.assertEqual(labels.shape, (NUM_EXAMPLES,))
        with self.assertLogs(logger="absl", level="INFO") as logs:
            self.task_cls(self.options()).train_arrays()
        lines = [line for line in logs.output if "in memory" in line]
        self.assertLen(lines, 1)
        size = NUM_EXAMPLES * (np.prod(self.stored_shape) + 8) / 1e6
        self.assertRegex(
            lines[0],
            rf"{self.task_cls.dataset_name}: {NUM_EXAMPLES} examples, {size:.1f} MB as stored "
            r"\(uint8, int64\), in memory \(≤ 25% of [\d.]+ GiB RAM \(in_memory_fraction\)\): "
            r"batches gathered in-graph\.",
        )
        self.assertIsNone(self.result.input_wait_share)

    def test_preprocess_matches_the_old_per_example_map(self):
        """`preprocess` on stored batches (eagerly, in a graph as in cifar10's loop, and under
        XLA as in mnist's) gives the floats the old per-example map gave: NumPy's float32
        k/255, bit for bit, for every uint8 value (graphs and XLA rewrite `x / 255.0` as
        `x * (1/255)`, which rounds 126 of them differently in float32)."""
        images, labels = self.trainer.train_arrays()
        expected = self.scaled(images)
        self.assertEqual(expected.shape, (NUM_EXAMPLES, *self.feature_shape))
        old = tf.data.Dataset.from_tensor_slices(images).map(self.old_map).batch(NUM_EXAMPLES)
        self.assertAllEqual(old.get_single_element(), expected)
        graph = tf.function(self.trainer.preprocess, jit_compile=False)
        compiled = tf.function(self.trainer.preprocess, jit_compile=True)
        every_value = np.resize(np.arange(256, dtype=np.uint8), images.shape)
        for preprocess in (self.trainer.preprocess, graph, compiled):
            features, same_labels = preprocess(tf.constant(images), tf.constant(labels))
            self.assertEqual(features.dtype, tf.float32)
            self.assertAllEqual(features, expected)
            self.assertAllEqual(same_labels, labels)
            features, _ = preprocess(tf.constant(every_value), tf.constant(labels))
            self.assertAllEqual(features, self.scaled(every_value))
        self.assertGreater(expected.max(), 0.99)  # mock pixels span 0..255: scaled, not clipped

    def test_train_dataset_batches_preprocess_to_scaled_float_features_and_int_labels(self):
        """Train batches (what strategies take) are stored uint8; after `preprocess`, float32
        features of the model's shape in [0, 1], k/255, and int labels."""
        dataset = self.trainer.train_dataset()
        features_spec, labels_spec = dataset.element_spec
        self.assertEqual(features_spec.dtype, tf.uint8)
        self.assertTrue(labels_spec.dtype.is_integer, labels_spec.dtype)
        # More batches than examples: the dataset repeats.
        num_batches = NUM_EXAMPLES // BATCH_SIZE + 2
        for batch in dataset.take(num_batches):
            features, labels = (t.numpy() for t in self.trainer.preprocess(*batch))
            self.assertEqual(features.dtype, np.float32)
            self.assertEqual(features.shape, (BATCH_SIZE, *self.feature_shape))
            self.assertGreaterEqual(features.min(), 0.0)
            self.assertLessEqual(features.max(), 1.0)
            # Scaled by exactly 1/255 from uint8 pixels (mock pixels span 0..255).
            self.assertAllClose(features * 255.0, np.round(features * 255.0), atol=1e-3)
            self.assertGreater(features.max(), 0.5)
            self.assertTrue(np.all((labels >= 0) & (labels < NUM_CLASSES)), labels)

    def test_evaluate_loss_matches_numpy_recomputation(self):
        """evaluate()'s loss and accuracy equal a NumPy recomputation over eval_dataset()."""
        results = self.trainer.evaluate()
        model = self.trainer.model
        losses, correct = [], []
        for batch in self.trainer.eval_dataset():
            features, labels = self.trainer.preprocess(*batch)
            logits = model(features, training=False).numpy()
            labels = labels.numpy()
            losses.append(_log_softmax_cross_entropy(logits, labels))
            correct.append(np.argmax(logits, axis=-1) == labels)
        losses, correct = np.concatenate(losses), np.concatenate(correct)
        self.assertLen(losses, NUM_EXAMPLES)
        self.assertAllClose(results["loss"], losses.mean(), atol=1e-5, rtol=0)
        self.assertAllClose(results["accuracy"], correct.mean(), atol=1e-6, rtol=0)
        # The loss is a mean per example, not per batch: a ragged last batch changes nothing.
        rebatched = self.trainer.eval_dataset().unbatch().batch(20)  # 20, 20, 8
        self.assertAllClose(
            self.trainer.evaluate(rebatched)["loss"], losses.mean(), atol=1e-5, rtol=0
        )
        # And the same through Keras' own loss.
        keras_losses = [
            keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
            for x, y in (self.trainer.preprocess(*b) for b in self.trainer.eval_dataset())
        ]
        self.assertAllClose(
            results["loss"], float(tf.reduce_mean(tf.concat(keras_losses, 0))), atol=1e-5, rtol=0
        )

    def test_tiny_in_memory_fraction_takes_the_tf_data_path(self):
        """Over `in_memory_fraction` of the RAM the data comes through tf.data, logged with
        the reason; training works the same way (`preprocess` in the step) and reports the
        share of time it waited for batches."""
        with op_determinism(False), self.assertLogs(logger="absl", level="INFO") as logs:
            trainer = self.task_cls(self.options(in_memory_fraction=1e-12))
            result = trainer.train()
        self.assertFalse(trainer.train_loop.in_memory)
        lines = [line for line in logs.output if "as stored" in line]
        self.assertLen(lines, 1)
        self.assertRegex(
            lines[0],
            r"over 1e-10% of [\d.]+ GiB RAM \(in_memory_fraction\): batches from a tf.data "
            r"pipeline\.",
        )
        self.assertEqual(result.step, TRAIN_STEPS)
        self.assertTrue(math.isfinite(result.train["loss"]))
        self.assertBetween(result.input_wait_share, 0.0, 1.0)
        features_spec, _ = trainer.train_dataset().element_spec
        self.assertEqual(features_spec.dtype, tf.uint8)  # no per-example map
        self.assertEqual(tuple(features_spec.shape), (BATCH_SIZE, *self.stored_shape))


class MnistTest(_TfdsTaskTest):
    """Mnist under mocked TFDS data."""

    task_cls = Mnist
    feature_shape = (784,)
    stored_shape = (28, 28, 1)

    def scaled(self, images):
        return images.reshape(len(images), 784).astype(np.float32) / np.float32(255)

    def old_map(self, image):
        return tf.reshape(tf.cast(image, tf.float32) / 255.0, [784])

    def test_resume_in_memory_is_exact(self):
        """6 steps with a model_dir, a fresh Trainer resuming to 12 ≡ 12 steps straight:
        the in-memory batch order is a function of the step (deterministic ops)."""
        root = self.create_tempdir().full_path
        # Without XLA: its compilation (three here) is not what is tested.
        opts = {
            "train_steps": 12,
            "checkpoint_every": 3,
            "deterministic": True,
            "jit_compile": False,
        }

        def train(model_dir, **overrides):
            # As in a fresh process: Keras numbers layer names per process, and a model_dir
            # holds one model's variable paths.
            keras.backend.clear_session()
            trainer = Mnist(self.options(**{**opts, **overrides}, model_dir=model_dir))
            return trainer, trainer.train()

        straight, _ = train(os.path.join(root, "straight"))
        first, _ = train(os.path.join(root, "broken"), train_steps=6)
        with self.assertLogs(logger="absl", level="INFO") as logs:
            resumed, result = train(os.path.join(root, "broken"))
        self.assertTrue(any("Restored" in line and "ckpt-6" in line for line in logs.output))
        self.assertEqual(result.step, 12)
        self.assertTrue(first.train_loop.in_memory)
        self.assertTrue(resumed.train_loop.in_memory)
        for a, b in zip(resumed.model.get_weights(), straight.model.get_weights()):
            np.testing.assert_array_equal(a, b)
        self.assertNotAllClose(first.model.get_weights()[0], straight.model.get_weights()[0])


class Cifar10Test(_TfdsTaskTest):
    """Cifar10 under mocked TFDS data."""

    task_cls = Cifar10
    feature_shape = (32, 32, 3)
    stored_shape = (32, 32, 3)

    def scaled(self, images):
        return images.astype(np.float32) / np.float32(255)

    def old_map(self, image):
        return tf.cast(image, tf.float32) / 255.0


del _TfdsTaskTest  # keeps pytest from collecting the base class on its own


class MnistModelTest(tf.test.TestCase):
    """The seed article's MNIST model."""

    def test_seed_model_is_dense64_relu_then_dense10(self):
        """The model is exactly Dense(64, relu) -> Dense(10 logits), 784*64+64 + 64*10+10 params."""
        model = Mnist(TrainerOptions()).build_model()
        self.assertLen(model.layers, 2)
        hidden, logits = model.layers
        self.assertIsInstance(hidden, keras.layers.Dense)
        self.assertIsInstance(logits, keras.layers.Dense)
        self.assertEqual(hidden.units, 64)
        self.assertEqual(hidden.activation, keras.activations.relu)
        self.assertEqual(logits.units, 10)
        self.assertEqual(logits.activation, keras.activations.linear)
        self.assertEqual(model.count_params(), 784 * 64 + 64 + 64 * 10 + 10)
        self.assertEqual(model.count_params(), 50_890)
        self.assertEqual(
            [tuple(w.shape) for w in model.weights], [(784, 64), (64,), (64, 10), (10,)]
        )


def _refuse_connections(*args, **kwargs):
    raise OSError("connections refused by the test")


class OfflineTest(tf.test.TestCase):
    """Without prepared data or network, the TFDS tasks fail fast with one-line ConfigErrors."""

    def _assert_fails_fast(self, task_cls):
        data_dir = tempfile.mkdtemp(prefix=f"{task_cls.dataset_name}_empty_")
        self.addCleanup(shutil.rmtree, data_dir, ignore_errors=True)
        # This checks the offline path: where the download host happens to answer, refuse
        # connections so that nothing is downloaded (the real reachability check still runs).
        patch = contextlib.nullcontext()
        if tfds_data._reachable(task_cls.download_host, timeout=1.0):
            patch = mock.patch.object(socket, "create_connection", _refuse_connections)
        start = time.perf_counter()
        with patch, self.assertRaises(ConfigError) as caught:
            task_cls(TrainerOptions(data_dir=data_dir)).train_dataset()
        elapsed = time.perf_counter() - start
        self.assertLess(elapsed, 30.0)
        message = str(caught.exception)
        self.assertIn(repr(task_cls.dataset_name), message)
        self.assertIn(data_dir, message)
        self.assertIn(task_cls.download_host, message)
        self.assertNotIn("\n", message)
        self.assertIsInstance(caught.exception, ValueError)
        # Nothing was downloaded or prepared.
        self.assertFalse(os.path.exists(os.path.join(data_dir, "downloads")))

    def test_mnist_without_data_raises_one_line_config_error_quickly(self):
        """Mnist.train_dataset(), empty data_dir: a one-line ConfigError in < 30 s."""
        self._assert_fails_fast(Mnist)

    def test_cifar10_without_data_raises_one_line_config_error_quickly(self):
        """Cifar10.train_dataset(), empty data_dir: a one-line ConfigError in < 30 s."""
        self._assert_fails_fast(Cifar10)


class SyntheticTest(tf.test.TestCase):
    """The offline default task."""

    def test_make_data_is_deterministic_with_expected_shapes(self):
        """make_data() gives the same arrays on every call (cached or not), of the stated shapes."""
        first = synthetic.make_data()
        uncached = synthetic.make_data.__wrapped__()
        self.assertLen(first, 4)
        for a, b in zip(first, synthetic.make_data()):
            self.assertAllEqual(a, b)
        for a, b in zip(first, uncached):
            self.assertAllEqual(a, b)
        x_train, y_train, x_eval, y_eval = first
        self.assertEqual(x_train.shape, (128, 64))
        self.assertEqual(y_train.shape, (128, 1))
        self.assertEqual(x_eval.shape, (4096, 64))
        self.assertEqual(y_eval.shape, (4096, 1))
        for array in first:
            self.assertEqual(array.dtype, np.float32)
            self.assertTrue(np.all(np.isfinite(array)))
        # The training targets are noisy, the held-out ones are not: different data.
        self.assertNotAllClose(x_train, x_eval[:128])

    def test_training_reduces_training_loss(self):
        """A few hundred Adam steps bring the training-set MSE well below its initial value."""
        trainer = synthetic.SyntheticRegression(
            TrainerOptions(train_steps=300, batch_size=64, steps_per_loop=100)
        )
        x_train, y_train, _, _ = synthetic.make_data()
        train_data = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(128)
        initial = trainer.evaluate(train_data)["loss"]
        result = trainer.train()
        final = trainer.evaluate(train_data)["loss"]
        self.assertEqual(result.step, 300)
        self.assertTrue(math.isfinite(initial) and math.isfinite(final), (initial, final))
        self.assertLess(final, 0.5 * initial)
        self.assertTrue(math.isfinite(result.eval["loss"]))


if __name__ == "__main__":
    tf.test.main()
