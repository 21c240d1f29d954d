"""The Trainer: the seed article's three examples on tapeloop, the loop, options and errors."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from array_task import ArrayTask, batches, mse, regression_data

from trainer import L2, ConfigError, DecoupledWeightDecay, SelectiveL2, TrainerOptions


def seed_model(regularizer=None) -> keras.Model:
    """The seed article's model: Dense(64, relu) on 784 inputs -> Dense(10, softmax)."""
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(64, activation="relu", kernel_regularizer=regularizer),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def seed_batch(n=32, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.rand(n, 784).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[rng.randint(0, 10, n)]
    return x, y


def numpy_forward(weights, x):
    """The seed model in float64 NumPy: softmax(relu(x·W1 + b1)·W2 + b2)."""
    w1, b1, w2, b2 = (np.asarray(w, np.float64) for w in weights)
    logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def categorical_crossentropy(labels, outputs):
    return keras.losses.categorical_crossentropy(labels, outputs)


def per_example_mse(labels, outputs):
    return keras.losses.mean_squared_error(labels, outputs)


class SeedExamplesTest(tf.test.TestCase):
    """The seed article's examples, rewritten on tapeloop, against hand-computed losses."""

    def setUp(self):
        super().setUp()
        self.x, self.y = seed_batch()

    def test_example1_keras_kernel_regularizer(self):
        """Example 1: `kernel_regularizer=l2(0.01)` reaches the loss as Keras promises.

        Reference: mean categorical cross-entropy + 0.01·Σ W1² (Keras' l2 has no ½).
        """
        task = ArrayTask(
            self.x,
            self.y,
            TrainerOptions(batch_size=32, train_steps=20, steps_per_loop=10),
            model_fn=lambda: seed_model(keras.regularizers.l2(0.01)),
            loss_fn=categorical_crossentropy,
        )
        weights = task.model.get_weights()
        p = np.clip(numpy_forward(weights, self.x), 1e-7, 1 - 1e-7)
        data = np.mean(-np.sum(self.y * np.log(p), axis=1))
        penalty = 0.01 * np.sum(np.square(weights[0], dtype=np.float64))
        total, data_loss, keras_term = task.compute_losses(self.x, self.y)
        self.assertEqual(task.loss_names, ["loss", "data_loss", "keras_regularizers"])
        self.assertAllClose(data_loss, data, rtol=1e-5)
        self.assertAllClose(keras_term, penalty, rtol=1e-5)
        self.assertAllClose(total, data + penalty, rtol=1e-5)
        result = task.train()
        self.assertLess(float(task.compute_losses(self.x, self.y)[0]), data + penalty)
        self.assertAllClose(
            result["train"]["loss"],
            result["train"]["data_loss"] + result["train"]["keras_regularizers"],
            rtol=1e-6,
        )

    def test_example2_manual_l2_over_all_variables(self):
        """Example 2: MSE + 0.01·Σ w² over ALL trainable variables (kernels and biases).

        The article's `tf.square(model.trainable_variables)` crashes on TF 2.21 (a list of
        differently shaped variables); `L2(0.01)` is the formula it meant.
        """
        task = ArrayTask(
            self.x,
            self.y,
            TrainerOptions(batch_size=32),
            model_fn=seed_model,
            loss_fn=per_example_mse,
            penalties=[L2(0.01)],
        )
        weights = task.model.get_weights()
        self.assertLen(weights, 4)
        data = np.mean((self.y - numpy_forward(weights, self.x)) ** 2)
        penalty = 0.01 * sum(np.sum(np.square(w, dtype=np.float64)) for w in weights)
        total, data_loss, l2_term = task.compute_losses(self.x, self.y)
        self.assertAllClose(data_loss, data, rtol=1e-5)
        self.assertAllClose(l2_term, penalty, rtol=1e-5)
        self.assertAllClose(total, data + penalty, rtol=1e-5)

    def test_example3_matches_the_corrected_hand_written_loop(self):
        """Example 3: a GradientTape loop with Adam; tapeloop ends with the same weights.

        The reference is the article's loop with the penalty fixed to
        `0.01 * tf.add_n([tf.reduce_sum(tf.square(v)) for v in model.trainable_variables])`.
        """
        steps, batch_size = 12, 16
        task = ArrayTask(
            self.x,
            self.y,
            TrainerOptions(batch_size=batch_size, train_steps=steps, steps_per_loop=5),
            model_fn=seed_model,
            loss_fn=per_example_mse,
            penalties=[L2(0.01)],
        )
        reference = seed_model()
        reference.set_weights(task.model.get_weights())
        optimizer = keras.optimizers.Adam()
        mse_loss = keras.losses.MeanSquaredError()

        @tf.function
        def train_step(images, labels):
            with tf.GradientTape() as tape:
                predictions = reference(images, training=True)
                l2_reg = 0.01 * tf.add_n(
                    [tf.reduce_sum(tf.square(v)) for v in reference.trainable_variables]
                )
                loss = mse_loss(labels, predictions) + l2_reg
            gradients = tape.gradient(loss, reference.trainable_variables)
            optimizer.apply_gradients(zip(gradients, reference.trainable_variables))

        for images, labels in batches(self.x, self.y, batch_size, steps):
            train_step(images, labels)
        task.train()
        for got, want in zip(task.model.get_weights(), reference.get_weights()):
            self.assertAllClose(got, want, atol=1e-6)


class TrainerLoopTest(parameterized.TestCase, tf.test.TestCase):
    def make_task(self, **options):
        x, y = regression_data(n=64)
        defaults = {"batch_size": 16, "train_steps": 12, "steps_per_loop": 4, "optimizer": "adam"}
        penalties = [SelectiveL2(1e-3, exclude="bias"), DecoupledWeightDecay(1e-2)]
        return ArrayTask(x, y, TrainerOptions(**{**defaults, **options}), penalties=penalties)

    def test_results_do_not_depend_on_steps_per_loop_or_tf_function(self):
        """1 step per call, 5 per call and eager mode end with the same weights."""
        runs = [
            self.make_task(steps_per_loop=1),
            self.make_task(steps_per_loop=5),
            self.make_task(use_tf_function=False),
        ]
        for task in runs:
            task.train()
        for task in runs[1:]:
            for got, want in zip(task.model.get_weights(), runs[0].model.get_weights()):
                self.assertAllClose(got, want, atol=1e-6)

    def test_loop_length_and_strength_changes_do_not_retrace(self):
        """Loops of 4, 4 and 2 steps and a new λ all run from one trace."""
        task = self.make_task(train_steps=10, steps_per_loop=4)
        task.train()
        self.assertEqual(task._train_loop.experimental_get_tracing_count(), 1)
        task.penalties[0].scale = 0.5
        means, _ = task._train_loop(iter(task.train_dataset()), tf.constant(3))
        self.assertEqual(task._train_loop.experimental_get_tracing_count(), 1)
        self.assertGreater(float(means[task.loss_names.index("penalty/selective_l2")]), 0)

    def test_result_breakdown_and_evaluation(self):
        """Total = data + penalty in the logs; `evaluate` equals the NumPy mean squared error."""
        task = self.make_task()
        result = task.train()
        train = result["train"]
        self.assertEqual(set(train), {"loss", "data_loss", "penalty/selective_l2"})
        self.assertAllClose(train["loss"], train["data_loss"] + train["penalty/selective_l2"])
        predictions = task.model.predict(task.x, verbose=0)
        expected = np.mean((task.y - predictions) ** 2)
        self.assertAllClose(result["eval"]["loss"], expected, rtol=1e-5)
        self.assertEqual(result["step"], 12)
        self.assertEqual(result["history"][-1]["step"], 12)

    def test_eval_every_sets_evaluation_points(self):
        task = self.make_task(train_steps=10, steps_per_loop=4, eval_every=3)
        result = task.train()
        self.assertEqual([h["step"] for h in result["history"]], [3, 6, 9, 10])

    def test_penalty_table_shows_coverage_per_variable(self):
        """Each variable with the penalties covering it; uncovered ones and totals stand out."""
        lines = self.make_task().penalty_table().splitlines()
        self.assertRegex(lines[1], r"^net/hidden/kernel +\(4, 3\) +12  selective_l2, decoupled")
        self.assertRegex(lines[2], r"^net/hidden/bias +\(3,\) +3  -- none --$")
        self.assertRegex(lines[3], r"^net/norm/gamma +\(3,\) +3  selective_l2$")
        self.assertIn("6 trainable variables, 29 parameters", lines)
        self.assertIn("  covered by no penalty: 2 variables, 5 parameters", lines)
        self.assertIn(
            "  selective_l2: 4 variables, 24 parameters  SelectiveL2(scale=0.001, exclude='bias')",
            lines,
        )

    def test_model_dir_gets_results(self):
        model_dir = self.create_tempdir().full_path
        task = self.make_task(model_dir=os.path.join(model_dir, "run"))
        result = task.train()
        with open(os.path.join(model_dir, "run", "results.json")) as f:
            self.assertEqual(json.load(f)["train"], result["train"])

    def test_scalar_compute_loss_is_rejected(self):
        """A reduced (scalar) loss would be averaged twice under tf.distribute: refuse it."""
        x, y = regression_data(n=16)
        task = ArrayTask(x, y, TrainerOptions(batch_size=8), loss_fn=lambda y, p: mse(y, p)[0])
        with self.assertRaisesRegex(ValueError, "per-example losses of shape"):
            task.compute_losses(x, y)

    def test_duplicate_penalty_names_are_rejected(self):
        x, y = regression_data(n=16)
        task = ArrayTask(x, y, penalties=[L2(0.1), L2(0.2)])
        with self.assertRaisesRegex(ConfigError, "Two penalties are named 'l2'"):
            task.build()
        task = ArrayTask(x, y, penalties=[L2(0.1), L2(0.2, name="l2_again")])
        task.build()
        self.assertEqual(task.loss_names[2:], ["penalty/l2", "penalty/l2_again"])

    def test_non_penalty_is_rejected(self):
        with self.assertRaisesRegex(ConfigError, "Penalty objects, got 'l2'"):
            ArrayTask(*regression_data(n=16), penalties=["l2"])

    @parameterized.named_parameters(
        ("zero_steps", {"train_steps": 0}, r"`train_steps` \(0\)"),
        ("negative_batch", {"batch_size": -3}, r"`batch_size` \(-3\)"),
        ("zero_steps_per_loop", {"steps_per_loop": 0}, r"`steps_per_loop` \(0\)"),
        ("float_steps", {"train_steps": 2.5}, r"`train_steps` \(2.5\)"),
        ("negative_eval_every", {"eval_every": -1}, r"`eval_every` \(-1\)"),
        ("zero_learning_rate", {"learning_rate": 0.0}, r"`learning_rate` \(0.0\)"),
        ("unknown_optimizer", {"optimizer": "adamm"}, r"`optimizer` \('adamm'\)"),
    )
    def test_bad_options(self, options, message):
        with self.assertRaisesRegex(ConfigError, message):
            TrainerOptions(**options)


if __name__ == "__main__":
    tf.test.main()
