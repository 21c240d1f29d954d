"""Data regularization on training batches (`Trainer.augment`, `trainer.augment`): label
smoothing against Keras, mixup against NumPy, resume, evaluation untouched, the built-in tasks
and the command line."""

import contextlib
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from array_task import ArrayTask
from cli_runner import CliTestCase, run_cli

from tasks.cifar10 import Cifar10
from tasks.mnist import Mnist
from trainer import Trainer, TrainerOptions, augment

tfds.disable_progress_bar()

CLASSES = 3
FEATURES = 4
EXAMPLES = 32
BATCH = 16
STEPS = 6
EPSILON = 0.1
ALPHA = 0.4


def classification_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    x = rng.randn(EXAMPLES, FEATURES).astype(np.float32)
    return x, rng.randint(0, CLASSES, EXAMPLES).astype(np.int64)


def classifier() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(CLASSES),
        ]
    )


class ArrayClassifier(ArrayTask):
    """Integer-labelled arrays, in order, with the built-in classification tasks' `augment`
    and `compute_loss` (those of `Mnist`, the code under test)."""

    num_classes = CLASSES
    augment = Mnist.augment
    compute_loss = Mnist.compute_loss

    def __init__(self, **options):
        x, y = classification_data()
        defaults = {"batch_size": BATCH, "train_steps": STEPS, "steps_per_loop": STEPS,
                    "optimizer": "sgd", "learning_rate": 0.5, "jit_compile": False}  # fmt: skip
        super().__init__(x, y, TrainerOptions(**{**defaults, **options}), model_fn=classifier)

    def build_metrics(self):
        return {"accuracy": keras.metrics.SparseCategoricalAccuracy()}


class PlainClassifier(ArrayClassifier):
    """The same task with the default (identity) `augment`."""

    augment = Trainer.augment


def assert_close(test, got, want):
    """Within 1e-6 of the reference tensor's largest magnitude: entries near 0 (biases) are
    differences of larger terms, whose rounding a per-entry relative tolerance would judge."""
    want = np.asarray(want)
    test.assertAllClose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


class LabelSmoothingTest(tf.test.TestCase):
    def train_reference(self, initial, smoothing_of):
        """A hand-written GradientTape loop: Keras `CategoricalCrossentropy(label_smoothing=
        ε)` on one-hot labels, SGD, the same batches in order. `smoothing_of` maps ε to what
        the loss object is given (the identity here; a wrong variant in the check below)."""
        model = classifier()
        model.set_weights(initial)
        loss_fn = keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=smoothing_of(EPSILON)
        )
        optimizer = keras.optimizers.SGD(0.5)
        x, y = classification_data()
        onehot = np.eye(CLASSES, dtype=np.float32)[y]
        for step in range(STEPS):
            start = step * BATCH % EXAMPLES
            xb, yb = x[start : start + BATCH], onehot[start : start + BATCH]
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            variables = model.trainable_variables
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return model.get_weights()

    def test_label_smoothing_trains_as_keras_categorical_crossentropy(self):
        """label_smoothing=0.1 ≡ Keras `CategoricalCrossentropy(label_smoothing=0.1)` (rtol
        1e-6); ε/(K−1) instead of ε/K is what the wrong variant must not match."""
        task = ArrayClassifier(label_smoothing=EPSILON)
        initial = task.model.get_weights()
        self.assertIn("techniques: label_smoothing=0.1, mixup_alpha=0", task.penalty_table())
        task.train()
        got = task.model.get_weights()
        for g, w in zip(got, self.train_reference(initial, lambda e: e), strict=True):
            assert_close(self, g, w)
        # ε·K/(K−1) in Keras' formula is ε/(K−1) per wrong class.
        wrong = self.train_reference(initial, lambda e: e * CLASSES / (CLASSES - 1))
        for g, w in zip(got, wrong, strict=True):
            with self.assertRaises(AssertionError):
                assert_close(self, g, w)


def reference_log_gamma(num, seed, alpha):
    """Marsaglia and Tsang's Gamma(α+1) in NumPy, the first of 16 candidates accepted, times
    U^(1/α); the normals and uniforms drawn by TensorFlow's stateless Philox ops, as in
    `trainer.augment.stateless_log_gamma`."""
    normal_seed, uniform_seed, boost_seed = tf.random.experimental.stateless_split(
        seed, 3, "philox"
    )
    draw = lambda op, shape, s: op(shape, s, dtype=tf.float64, alg="philox").numpy()  # noqa: E731
    x = draw(tf.random.stateless_normal, [16, num], normal_seed)
    u = draw(tf.random.stateless_uniform, [16, num], uniform_seed)
    boost = draw(tf.random.stateless_uniform, [num], boost_seed)
    d = alpha + 1 - 1 / 3
    out = np.empty(num)
    for j in range(num):
        for i in range(16):
            v = (1 + x[i, j] / np.sqrt(9 * d)) ** 3
            if v > 0 and np.log(u[i, j]) < 0.5 * x[i, j] ** 2 + d - d * v + d * np.log(v):
                out[j] = np.log(d * v)
                break
    return out + np.log(boost) / alpha


def reference_mixup(x, y_onehot, seed, alpha, epsilon):
    """mixup in NumPy: λ = g₁/(g₁+g₂) from `reference_log_gamma`, the permutation as the
    argsort of stateless uniforms, for the int64 seed split in two; smoothing first (ε/K),
    then the mix."""
    seed = tf.constant(seed, tf.int64)  # the draws depend on the seed's dtype too
    gamma_seed, perm_seed = tf.random.experimental.stateless_split(seed, 2, "philox")
    g = np.exp(reference_log_gamma(2, gamma_seed, alpha))
    lam = np.float32(g[0] / (g[0] + g[1]))
    uniforms = tf.random.stateless_uniform([len(x)], perm_seed, alg="philox").numpy()
    perm = np.argsort(uniforms, kind="stable")
    y = y_onehot * (1 - epsilon) + epsilon / y_onehot.shape[1]
    mix = lambda t: lam * t + (1 - lam) * t[perm]  # noqa: E731
    return mix(x.astype(np.float64)), mix(y.astype(np.float64))


class MixupTest(tf.test.TestCase):
    def test_gamma_and_beta_draws_have_their_distributions_moments(self):
        """20000 draws: Gamma(α) has mean and variance α, g₁/(g₁+g₂) the Beta(α, α) variance
        1/(4(2α+1)), within 5 standard errors (a Gamma(α+1) without the U^(1/α) boost, or
        one λ = g₁ from a single Gamma, lands far outside)."""
        n = 20000
        for alpha in (0.2, 1.0, 4.0):
            with self.subTest(alpha=alpha):
                log_g = augment.stateless_log_gamma(n, tf.constant([5, 6], tf.int64), alpha)
                g = np.exp(log_g.numpy())
                self.assertAllClose(g.mean(), alpha, atol=5 * np.sqrt(alpha / n), rtol=0)
                # Var of the sample variance ≈ (μ₄ − σ⁴)/n, μ₄ = 3α² + 6α for Gamma(α).
                se_var = np.sqrt((3 * alpha**2 + 6 * alpha - alpha**2) / n)
                self.assertAllClose(g.var(), alpha, atol=5 * se_var, rtol=0)
                lam = g[0::2] / (g[0::2] + g[1::2])
                beta_var = 1 / (4 * (2 * alpha + 1))
                self.assertAllClose(lam.mean(), 0.5, atol=5 * np.sqrt(beta_var / (n / 2)), rtol=0)
                self.assertAllClose(lam.var(), beta_var, rtol=0.1, atol=0)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.task = ArrayClassifier(mixup_alpha=ALPHA, label_smoothing=EPSILON, seed=7)
        cls.task.build()

    def test_mixed_batch_matches_numpy_for_the_step_seed(self):
        """At optimizer steps 0 and 3, `augment` ≡ the NumPy mix of the draws seeded by
        (options.seed, step); a seed without the step fails at step 3."""
        x, y = classification_data()
        xb, yb = x[:BATCH], y[:BATCH]
        onehot = np.eye(CLASSES)[yb]
        iterations = self.task.optimizer.iterations
        for step in (0, 3):
            with self.subTest(step=step):
                iterations.assign(step)
                features, labels = self.task.augment(*self.task.preprocess(xb, yb))
                want_x, want_y = reference_mixup(xb, onehot, [7, step], ALPHA, EPSILON)
                self.assertAllClose(features, want_x, rtol=1e-6, atol=1e-7)
                self.assertAllClose(labels, want_y, rtol=1e-6, atol=1e-7)
                self.assertAllClose(tf.reduce_sum(labels, axis=1), np.ones(BATCH))
                if step:
                    _, wrong_y = reference_mixup(xb, onehot, [7, 0], ALPHA, EPSILON)
                    self.assertNotAllClose(labels, wrong_y, rtol=1e-6, atol=1e-7)
        iterations.assign(0)

    def test_mixup_changes_training_and_resume_is_bit_identical(self):
        """mixup + smoothing, deterministic: 3 steps, checkpoint, resume to 6 ≡ 6 steps at
        once, bit for bit; and the run differs from one without augmentation."""
        options = {"mixup_alpha": ALPHA, "label_smoothing": EPSILON, "deterministic": True}
        straight = ArrayClassifier(**options)
        straight.train()
        model_dir = self.create_tempdir().full_path
        options.update(model_dir=model_dir, checkpoint_every=STEPS // 2, steps_per_loop=2)
        ArrayClassifier(**{**options, "train_steps": STEPS // 2}).train()
        keras.backend.clear_session()
        resumed = ArrayClassifier(**options)
        resumed.train()
        self.assertEqual(int(resumed.optimizer.iterations), STEPS)
        for got, want in zip(resumed.model.get_weights(), straight.model.get_weights()):
            self.assertAllEqual(got, want)
        plain = ArrayClassifier(deterministic=True)
        plain.train()
        self.assertNotAllClose(plain.model.get_weights()[0], straight.model.get_weights()[0])


class OnlyTrainingBatchesTest(tf.test.TestCase):
    def test_augment_runs_on_training_batches_only_and_off_adds_no_op(self):
        """A marking `augment` counts the examples it sees: the training steps' only, not
        evaluation's; it sums the steps its seeds hold (each its own, inside the compiled
        loop); and with the options off the classification tasks' loop graph has as many
        nodes as with the default hook."""
        seen = tf.Variable(0, dtype=tf.int64, trainable=False)
        seed_steps = tf.Variable(0, dtype=tf.int64, trainable=False)

        class Marking(PlainClassifier):
            def augment(self, features, labels):
                seen.assign_add(tf.shape(labels, out_type=tf.int64)[0])
                seed_steps.assign_add(self.augment_seed()[1])
                return features, labels

        task = Marking(train_steps=4, steps_per_loop=2)
        task.train()
        task.evaluate()
        self.assertEqual(int(seen.numpy()), 4 * BATCH)
        # Inside the compiled loop each step's seed holds its own step: 0 + 1 + 2 + 3.
        self.assertEqual(int(seed_steps.numpy()), 0 + 1 + 2 + 3)

        def nodes(task):
            iterator = iter(task.train_dataset())
            graph_def = task.train_loop.concrete_function(iterator).graph.as_graph_def()
            return len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)

        with_hook, default = ArrayClassifier(), PlainClassifier()
        self.assertEqual(nodes(with_hook), nodes(default))
        # The count sees the step's ops: smoothing's categorical loss is another graph.
        self.assertNotEqual(nodes(ArrayClassifier(label_smoothing=EPSILON)), nodes(default))


class BuiltinTasksTest(tf.test.TestCase):
    """mnist and cifar10 on mocked TFDS records; one mnist run with both options is shared."""

    @classmethod
    def options(cls, **kwargs):
        defaults = {"train_steps": 2, "batch_size": 8, "steps_per_loop": 2,
                    "data_dir": cls.data_dir}  # fmt: skip
        return TrainerOptions(**{**defaults, **kwargs})

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.data_dir = tempfile.mkdtemp(prefix="augment_mock_")
        cls.addClassCleanup(shutil.rmtree, cls.data_dir, ignore_errors=True)
        stack = contextlib.ExitStack()
        cls.addClassCleanup(stack.close)
        stack.enter_context(tfds.testing.mock_data(num_examples=32))
        cls.mnist = Mnist(
            cls.options(
                label_smoothing=0.3, mixup_alpha=ALPHA, eval_every=2, train_eval_examples=16
            )
        )
        cls.result = cls.mnist.train()

    def test_mnist_trains_with_the_options_under_xla(self):
        """mnist trains with label smoothing and mixup, its in-memory loop compiled with XLA
        by default (the draws have XLA kernels), with finite losses."""
        self.assertEqual(self.result.step, 2)
        self.assertTrue(self.mnist.train_loop.xla)
        self.assertTrue(np.isfinite(self.mnist.train_loop.run(1)[0]["loss"]))

    def test_training_metrics_compare_with_the_soft_labels_dominant_class(self):
        """With soft labels, the streamed training accuracy counts the examples whose
        prediction is the soft label's dominant class: a share of the 16 examples trained on
        (2 steps of 8), as the training slice's accuracy is of its 16."""
        for value in (self.result.train["train/accuracy"], self.result.train_eval["accuracy"]):
            self.assertBetween(value, 0.0, 1.0)
            self.assertAllClose(value * 16, round(value * 16), atol=1e-4)

    def test_cifar10_trains_with_the_options(self):
        task = Cifar10(self.options(label_smoothing=EPSILON, mixup_alpha=ALPHA))
        self.assertEqual(task.train().step, 2)
        self.assertTrue(np.isfinite(task.train_loop.run(1)[0]["loss"]))

    def test_evaluation_is_identical_with_and_without_augmentation(self):
        """The same weights evaluate to the same loss and accuracy, bit for bit, whatever the
        augmentation options (the eval loss stays the unsmoothed sparse cross-entropy)."""
        plain = Mnist(self.options())
        plain.model.set_weights(self.mnist.model.get_weights())
        got, want = self.mnist.evaluate(), plain.evaluate()
        self.assertEqual(set(got), {"loss", "accuracy"})
        for name in got:
            self.assertAllEqual(got[name], want[name])


class CommandLineTest(CliTestCase):
    def test_bad_values_and_unsupported_task_are_one_line_usage_errors(self):
        """Out-of-range values, and the options on a task that does not apply them (the
        synthetic regression task), exit 2 with one line naming the option and value."""
        self.assert_usage_error(run_cli("--label_smoothing=1"), "`label_smoothing` (1.0)")
        self.assert_usage_error(run_cli("--mixup_alpha=-0.5"), "`mixup_alpha` (-0.5)")
        self.assert_usage_error(
            run_cli("--task=synthetic", "--label_smoothing=0.1"),
            "`label_smoothing` (0.1)",
            "SyntheticRegression",
        )


if __name__ == "__main__":
    tf.test.main()
