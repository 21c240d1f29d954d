"""The Trainer: the seed article's three examples on tapeloop, the loop, options and errors."""

import json
import os
from typing import ClassVar

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
        self.assertEqual(task.built.loss_names, ["loss", "data_loss", "keras_regularizers"])
        self.assertAllClose(data_loss, data, rtol=1e-5)
        self.assertAllClose(keras_term, penalty, rtol=1e-5)
        self.assertAllClose(total, data + penalty, rtol=1e-5)
        result = task.train()
        self.assertLess(float(task.compute_losses(self.x, self.y)[0]), data + penalty)
        self.assertAllClose(
            result.train["loss"],
            result.train["data_loss"] + result.train["keras_regularizers"],
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
        self.assertEqual(task.train_loop.trace_counts(), {"step": 1, "loop": 1, "steps": 0})
        task.penalties[0].scale = 0.5
        means, _ = task.train_loop.run(3, iter(task.train_dataset()))
        self.assertEqual(task.train_loop.trace_counts(), {"step": 1, "loop": 1, "steps": 0})
        self.assertGreater(means["penalty/selective_l2"], 0)

    def test_result_breakdown_and_evaluation(self):
        """Total = data + penalty in the logs; `evaluate` equals the NumPy mean squared error."""
        task = self.make_task()
        result = task.train()
        train = result.train
        self.assertEqual(set(train), {"loss", "data_loss", "penalty/selective_l2"})
        self.assertAllClose(train["loss"], train["data_loss"] + train["penalty/selective_l2"])
        predictions = task.model.predict(task.x, verbose=0)
        expected = np.mean((task.y - predictions) ** 2)
        self.assertAllClose(result.eval["loss"], expected, rtol=1e-5)
        self.assertEqual(result.step, 12)
        self.assertEqual(result.history[-1]["step"], 12)

    def test_eval_every_sets_evaluation_points(self):
        task = self.make_task(train_steps=10, steps_per_loop=4, eval_every=3)
        result = task.train()
        self.assertEqual([h["step"] for h in result.history], [3, 6, 9, 10])

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
            self.assertEqual(json.load(f)["train"], result.train)

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
        self.assertEqual(task.built.loss_names[2:], ["penalty/l2", "penalty/l2_again"])

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


def decayed_rows(table: str) -> set[str]:
    """The variable paths whose row in a penalty table names the optimizer's weight decay."""
    return {line.split()[0] for line in table.splitlines() if "optimizer_weight_decay," in line
            or line.endswith("optimizer_weight_decay")}  # fmt: skip


class TaskFieldsTest(tf.test.TestCase):
    """The engine lives in the `Built` object, not in attributes of the user's task."""

    # Every attribute an older build() set on the task, and the engine's parts' names.
    ENGINE_NAMES = (
        "metrics", "techniques", "selections", "coverage", "step_counter", "loss_names",
        "trainable_variables", "chain", "variables", "loss_penalties", "replica_step",
        "eval_step", "_model", "_loop", "_updates", "_loss_penalties", "_loss_scaled",
        "_eval_step",
    )  # fmt: skip

    def test_build_and_train_set_no_attribute_on_the_task(self):
        x, y = regression_data(n=32)
        task = ArrayTask(x, y, TrainerOptions(batch_size=8, train_steps=4, eval_every=2),
                         penalties=[L2(1e-3), DecoupledWeightDecay(1e-3)])  # fmt: skip
        for name in self.ENGINE_NAMES:
            setattr(task, name, f"the task's own {name}")
        before = dict(vars(task))
        task.build()
        task.train()
        task.evaluate(tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
        self.assertEqual(sorted(vars(task)), sorted(before))  # no attribute added
        for name in self.ENGINE_NAMES:  # and none of the task's overwritten
            self.assertIs(getattr(task, name), before[name], name)
        # The engine's parts are reachable through the one typed object.
        self.assertEqual(task.built.loss_names, ["loss", "data_loss", "penalty/l2"])
        self.assertEqual(int(task.built.step_counter.numpy()), 4)
        self.assertIs(task.model, task.built.model)


class DecayVisibilityTest(parameterized.TestCase, tf.test.TestCase):
    """Every decay shows in the penalty table, none is doubled (the optimizer's own included)."""

    def task(self, optimizer="adam", penalties=()):
        """`optimizer`: a name for `TrainerOptions`, or a function making an optimizer."""
        x, y = regression_data(n=64)
        name, make = (optimizer, None) if isinstance(optimizer, str) else ("adam", optimizer)
        options = TrainerOptions(batch_size=16, train_steps=1, learning_rate=0.1, optimizer=name)
        return ArrayTask(x, y, options, optimizer=make, penalties=penalties,
                         loss_fn=lambda labels, outputs: 0.0 * mse(labels, outputs))  # fmt: skip

    def changed_by_one_step(self, task) -> set[str]:
        """Paths of the variables one step moves. The loss is 0·MSE, so its gradients are 0
        and Adam's update is 0: only a decay can move a weight."""
        rng = np.random.RandomState(0)
        for v in task.model.trainable_variables:  # biases and norms away from 0 and 1
            v.assign(rng.randn(*v.shape).astype(np.float32))
        before = {v.path: v.numpy() for v in task.model.trainable_variables}
        task.train_loop.run(1, iter(task.train_dataset()))
        return {
            v.path for v in task.model.trainable_variables if np.any(v.numpy() != before[v.path])
        }

    def test_adamw_decays_every_variable_and_the_table_says_so(self):
        """`optimizer="adamw"` (Keras' AdamW, weight_decay 0.004): every variable moves, and
        every row of the table names the optimizer's decay."""
        task = self.task(optimizer="adamw")
        table = task.penalty_table()
        self.assertIn("AdamW(weight_decay=0.004), the optimizer's own", table)
        paths = {v.path for v in task.model.trainable_variables}
        self.assertEqual(decayed_rows(table), paths)
        self.assertEqual(self.changed_by_one_step(task), paths)

    def test_exclude_from_weight_decay_is_honoured(self):
        """An optimizer that excludes biases and norms: the table shows exactly what moves."""

        def adamw():
            optimizer = keras.optimizers.AdamW(0.1, weight_decay=0.5)
            optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
            return optimizer

        task = self.task(optimizer=adamw)
        decayed = decayed_rows(task.penalty_table())
        self.assertEqual(decayed, {"net/hidden/kernel", "net/out/kernel"})
        self.assertEqual(self.changed_by_one_step(task), decayed)

    def test_no_decay_no_row(self):
        task = self.task(optimizer=lambda: keras.optimizers.Adam(0.1))
        self.assertEqual(decayed_rows(task.penalty_table()), set())
        self.assertEqual(self.changed_by_one_step(task), set())

    @parameterized.named_parameters(
        ("adamw_and_decoupled", "adamw", [DecoupledWeightDecay(1e-2)],
         r"'net/hidden/kernel' would be decayed twice, by DecoupledWeightDecay\(rate=0.01\) and "
         r"by AdamW\(weight_decay=0.004\), the optimizer's own"),
        ("two_decoupled", "adam",
         [DecoupledWeightDecay(1e-2), DecoupledWeightDecay(1e-3, include="out", name="wd2")],
         r"'net/out/kernel' would be decayed twice, by DecoupledWeightDecay\(rate=0.01\) and "
         r"by DecoupledWeightDecay\(rate=0.001, include='out', name='wd2'\)"),
    )  # fmt: skip
    def test_two_decays_on_one_variable_are_refused(self, optimizer, penalties, message):
        x, y = regression_data(n=64)
        task = ArrayTask(x, y, TrainerOptions(optimizer=optimizer), penalties=penalties)
        with self.assertRaisesRegex(ConfigError, message):
            task.build()

    def test_decay_and_l2_on_one_variable_are_allowed(self):
        """L2 is a loss term, not a decay: with decoupled decay it is not double-counting."""
        task = self.task(penalties=[L2(1e-3), DecoupledWeightDecay(1e-2)])
        self.assertIn("l2, decoupled_weight_decay", task.penalty_table())


class OptionsTest(tf.test.TestCase):
    def test_make_options_applies_task_defaults_then_overrides(self):
        class Defaults(ArrayTask):
            default_options: ClassVar[dict] = {"batch_size": 8, "learning_rate": 0.5}

        options = Defaults.make_options(learning_rate=0.25)
        self.assertEqual((options.batch_size, options.learning_rate), (8, 0.25))
        self.assertEqual(options.train_steps, TrainerOptions().train_steps)

    def test_unknown_option_names_are_refused(self):
        class Typo(ArrayTask):
            default_options: ClassVar[dict] = {"batchsize": 8}

        with self.assertRaisesRegex(ConfigError, r"Typo default_options: 'batchsize' is not"):
            Typo.make_options()
        with self.assertRaisesRegex(ConfigError, r"options: 'lr' is not a TrainerOptions field"):
            ArrayTask.make_options(lr=0.1)


if __name__ == "__main__":
    tf.test.main()
