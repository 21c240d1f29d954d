"""Parameter groups (`lr_multiplier`, `freeze`): per-group learning rates ≡ one Keras optimizer
per group, frozen weights bit for bit, the decay's scaling, errors, the CLI, replicas, skipped
steps, resume and the coverage table."""

import json
import os
import re

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from array_task import ArrayTask, named_mlp, regression_data
from cli_runner import CliTestCase, context, run_cli

from trainer import (
    ConfigError,
    DecoupledWeightDecay,
    Freeze,
    LayerwiseLrDecay,
    LrMultiplier,
    MaxNorm,
    TrainerOptions,
    parse_param_group_spec,
)
from trainer.distribution import make_strategy

BATCH, STEPS, M = 8, 5, 0.1
# The trainer's optimizer at `lr`; the reference's, at `lr` and at `M·lr`.
OPTIMIZERS = {
    "sgd": (lambda lr: keras.optimizers.SGD(lr), 0.05),
    "momentum": (lambda lr: keras.optimizers.SGD(lr, momentum=0.9), 0.05),
    "adam": (lambda lr: keras.optimizers.Adam(lr), 0.01),
    "rmsprop": (lambda lr: keras.optimizers.RMSprop(lr, momentum=0.5), 0.01),
    "adamw": (lambda lr: keras.optimizers.AdamW(lr, weight_decay=0.05), 0.01),
}


def zero_loss(labels, outputs):
    """No gradient at all: only the decay moves the weights."""
    return 0.0 * tf.reduce_mean(tf.square(labels - outputs), axis=-1)


def relative_diff(a, b) -> float:
    """The largest difference relative to the largest magnitude of the tensor `b`."""
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(np.float32).tiny))


class GroupsTestBase(parameterized.TestCase, tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.x, cls.y = regression_data(n=32)
        keras.utils.set_random_seed(1)
        cls.init = named_mlp().get_weights()

    def task(self, optimizer, groups, penalties=(), steps=STEPS, y=None, **kwargs):
        options = {"batch_size": BATCH, "train_steps": steps, "steps_per_loop": steps}
        options.update(kwargs.pop("options", {}))
        y = self.y if y is None else y
        task = ArrayTask(self.x, y, TrainerOptions(**options), model_fn=named_mlp,
                         optimizer=optimizer, penalties=penalties, param_groups=groups,
                         **kwargs)  # fmt: skip
        task.model.set_weights(self.init)
        return task

    def reference(self, make_optimizer, lr, multiplied, scale_gradients=False, m=M):
        """A hand-written GradientTape loop: the `multiplied` variables (indices) by their
        own optimizer at m·lr, the others by one at lr. With `scale_gradients`, the wrong
        variant: one optimizer at lr, the multiplied variables' gradients times m."""
        model = named_mlp()
        model.set_weights(self.init)
        variables = model.trainable_variables
        ours = [v for i, v in enumerate(variables) if i in multiplied]
        others = [v for i, v in enumerate(variables) if i not in multiplied]
        rest, group = make_optimizer(lr), make_optimizer(lr if scale_gradients else m * lr)
        for step in range(STEPS):
            start = step * BATCH % len(self.x)
            x, y = self.x[start : start + BATCH], self.y[start : start + BATCH]
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(y - model(x, training=True)))
            gradients = dict(zip(map(id, variables), tape.gradient(loss, variables)))
            factor = m if scale_gradients else 1.0
            rest.apply_gradients([(gradients[id(v)], v) for v in others])
            group.apply_gradients([(factor * gradients[id(v)], v) for v in ours])
        return model.get_weights()


class LrMultiplierTest(GroupsTestBase):
    @parameterized.named_parameters(*[(name, name) for name in OPTIMIZERS])
    def test_lr_multiplier_equals_one_optimizer_per_group(self, name):
        """`lr_multiplier(0.1, include='hidden/')` ≡ Keras optimizers at lr and 0.1·lr on the
        two groups, 5 steps, ≤ 1e-6 relative per tensor (AdamW's own weight decay included).
        Under Adam, scaling the gradients instead (the wrong variant) lands far away."""
        make_optimizer, lr = OPTIMIZERS[name]
        task = self.task(lambda: make_optimizer(lr), [LrMultiplier(M, include="hidden/")])
        task.train()
        got = task.model.get_weights()
        expected = self.reference(make_optimizer, lr, multiplied={0, 1})
        for a, b in zip(got, expected):
            self.assertLess(relative_diff(a, b), 1e-6)
        self.assertGreater(relative_diff(got[0], self.init[0]), 1e-4)  # they did train
        if name == "adam":
            wrong = self.reference(make_optimizer, lr, multiplied={0, 1}, scale_gradients=True)
            self.assertGreater(relative_diff(wrong[0], expected[0]), 1e-3)

    def test_layerwise_lr_decay_equals_one_optimizer_per_layer(self):
        """`layerwise_lr_decay(0.5)` on the 2-layer MLP ≡ Adam at 0.5·lr on the hidden layer
        and lr on the output layer, ≤ 1e-6 relative; the table shows each layer's rate."""
        task = self.task(lambda: keras.optimizers.Adam(0.01), [LayerwiseLrDecay(0.5)])
        task.train()
        expected = self.reference(lambda lr: keras.optimizers.Adam(lr), 0.01, {0, 1}, m=0.5)
        for a, b in zip(task.model.get_weights(), expected):
            self.assertLess(relative_diff(a, b), 1e-6)
        rows = {line.split()[0]: line for line in task.penalty_table().splitlines()}
        self.assertTrue(rows["net/hidden/bias"].endswith("lr×0.5"))
        self.assertTrue(rows["net/out/kernel"].endswith("lr×1"))
        self.assertIn("lr×0.5^depth (4 variables)", task.penalty_table())
        with self.assertRaisesRegex(ConfigError, r"`rate` \(1.5\) must be in \(0, 1\]"):
            LayerwiseLrDecay(1.5)

    def test_with_decoupled_decay_the_group_decays_by_m_lr_rate(self):
        """No gradient (a zero loss), SGD(lr), decoupled decay `rate` on the kernels: the
        multiplied kernel is (1 − m·lr·rate)^T·w0, the other (1 − lr·rate)^T·w0, ≤ 1e-6
        relative; a frozen bias outside the decay stays as it was, bit for bit."""
        lr, rate = 0.1, 0.5
        task = self.task(lambda: keras.optimizers.SGD(lr), [LrMultiplier(M, include="hidden/"),
                         Freeze(include="out/bias")], [DecoupledWeightDecay(rate)],
                         loss_fn=zero_loss)  # fmt: skip
        task.train()
        hidden, _, out, bias = task.model.get_weights()
        closed_form = (1 - M * lr * rate) ** STEPS * self.init[0]
        self.assertAllClose(hidden, closed_form, rtol=1e-6, atol=0)
        self.assertAllClose(out, (1 - lr * rate) ** STEPS * self.init[2], rtol=1e-6, atol=0)
        self.assertAllEqual(bias, self.init[3])


class FreezeTest(GroupsTestBase):
    def test_freeze_leaves_weights_bit_identical_while_others_train(self):
        """Adam with decoupled decay on every kernel: the frozen kernel is bit for bit its
        initial value (neither updated nor decayed); every other tensor moved."""
        task = self.task(lambda: keras.optimizers.Adam(0.01), [Freeze(include="hidden/kernel")],
                         [DecoupledWeightDecay(0.5)])  # fmt: skip
        task.train()
        got = task.model.get_weights()
        self.assertAllEqual(got[0], self.init[0])
        for a, b in zip(got[1:], self.init[1:]):
            self.assertGreater(np.max(np.abs(a - b)), 1e-4)

    def test_a_step_the_loss_scale_optimizer_skips_changes_nothing(self):
        """A loss scale of 2¹²⁷ overflows: the skipped first step leaves every weight bit for
        bit (multiplied, frozen, decayed or not); the later applied steps keep the frozen one."""
        task = self.task(
            lambda: keras.optimizers.LossScaleOptimizer(
                keras.optimizers.Adam(0.01), initial_scale=2.0**127
            ),
            [LrMultiplier(M, include="hidden/"), Freeze(include="out/kernel")],
            [DecoupledWeightDecay(0.5)],
            y=self.y * 1e3,  # gradients above 1: times 2¹²⁷, they overflow
        )
        iterator = iter(task.train_dataset())
        task.train_loop.run(1, iterator)
        self.assertEqual(int(task.optimizer.iterations), 0)
        for got, expected in zip(task.model.get_weights(), self.init):
            self.assertAllEqual(got, expected)
        while int(task.optimizer.iterations) == 0:
            task.train_loop.run(1, iterator)
        got = task.model.get_weights()
        self.assertAllEqual(got[2], self.init[2])
        self.assertGreater(np.max(np.abs(got[0] - self.init[0])), 1e-5)


class DistributedAndResumeTest(GroupsTestBase):
    GROUPS = staticmethod(lambda: [LrMultiplier(M, include="hidden/"), Freeze(include="out/bias")])

    def test_two_replicas_match_one_device(self):
        """MirroredStrategy on 2 logical CPUs ≡ one device, 10 Adam steps with decoupled
        decay: ≤ 1e-6 relative per tensor; the frozen bias bit for bit on both."""
        make = lambda: keras.optimizers.Adam(0.01)  # noqa: E731
        one = self.task(make, self.GROUPS(), [DecoupledWeightDecay(0.5)], steps=10)
        one.train()
        mirrored = make_strategy("mirrored", cpu_replicas=2)
        two = self.task(make, self.GROUPS(), [DecoupledWeightDecay(0.5)], steps=10,
                        strategy=mirrored)  # fmt: skip
        two.train()
        for a, b in zip(two.model.get_weights(), one.model.get_weights()):
            self.assertLess(relative_diff(a, b), 1e-6)
        self.assertAllEqual(two.model.get_weights()[3], self.init[3])
        self.assertGreater(relative_diff(one.model.get_weights()[0], self.init[0]), 1e-4)

    def test_resume_is_bit_identical(self):
        """deterministic=True: 4 steps, then resumed to 8 ≡ 8 steps straight, bit for bit;
        `tapeloop.json` records the groups as written."""
        make = lambda: keras.optimizers.Adam(0.01)  # noqa: E731

        def run(model_dir, steps):
            options = {"deterministic": True, "model_dir": model_dir, "steps_per_loop": 4}
            task = self.task(make, self.GROUPS(), steps=steps, options=options)
            task.train()
            return task.model.get_weights()

        straight = run(self.create_tempdir().full_path, 8)
        model_dir = self.create_tempdir().full_path
        run(model_dir, 4)
        with open(os.path.join(model_dir, "tapeloop.json")) as f:
            recorded = json.load(f)["settings"]["param_groups"]
        self.assertEqual(recorded, [repr(g) for g in self.GROUPS()])
        resumed = run(model_dir, 8)
        for a, b in zip(resumed, straight):
            self.assertAllEqual(a, b)
        self.assertAllEqual(resumed[3], self.init[3])


class ConfigTest(GroupsTestBase, CliTestCase):
    def test_a_variable_in_two_groups_is_an_error_naming_both(self):
        for second in (LrMultiplier(2.0, include="kernel"), Freeze(include="hidden/kernel")):
            with self.assertRaisesRegex(ConfigError, "two parameter groups") as raised:
                self.task(None, [LrMultiplier(M, include="hidden/"), second])  # builds
            message = str(raised.exception)
            self.assertIn("'net/hidden/kernel'", message)
            self.assertIn("LrMultiplier(0.1, include='hidden/')", message)
            self.assertIn(repr(second), message)

    def test_selection_and_value_errors(self):
        """A regex matching nothing; a projection on a frozen variable; bad multipliers."""
        with self.assertRaisesRegex(ConfigError, "include='hiden/' matches no variable path"):
            self.task(None, [Freeze(include="hiden/")])
        with self.assertRaisesRegex(ConfigError, "frozen by Freeze.*projected by MaxNorm"):
            self.task(None, [Freeze(include="out/")], [MaxNorm(1.0)])
        for bad in (0, -1.0, float("nan"), "x", True):
            with self.assertRaisesRegex(ConfigError, r"`multiplier` \("):
                LrMultiplier(bad)
        with self.assertRaisesRegex(ConfigError, "not a valid regex"):
            Freeze(include="(")

    def test_spec_parsing(self):
        group = parse_param_group_spec("lr_multiplier(0.5, include='dense/', exclude='bias')")
        self.assertEqual(repr(group), "LrMultiplier(0.5, include='dense/', exclude='bias')")
        self.assertEqual(repr(parse_param_group_spec("freeze")), "Freeze()")
        group = parse_param_group_spec("layerwise_lr_decay(0.8, exclude='bias')")
        self.assertEqual(repr(group), "LayerwiseLrDecay(0.8, exclude='bias')")
        for spec, fragment in (
            ("nope(1)", "Unknown parameter group 'nope'"),
            ("freeze(1)", "freeze takes freeze(*, include=None, exclude=None)"),
            ("lr_multiplier(x)", "not a literal"),
            ("lr_multiplier(0.1", "Malformed parameter group spec"),
        ):
            with self.assertRaisesRegex(ConfigError, re.escape(fragment)):
                parse_param_group_spec(spec)

    def test_cli_bad_spec_exits_2_and_describe_shows_the_multiplier(self):
        """In process: a bad multiplier is one line and exit 2; `--describe` lists `lr×0.1`
        and `frozen` per variable in the coverage table, and the stage in the step line."""
        bad = run_cli("--train_steps=1", "--param_group=lr_multiplier(-2)")
        self.assert_usage_error(bad, "'lr_multiplier(-2)'", "`multiplier` (-2)")
        result = run_cli("--describe", "--param_group=lr_multiplier(0.1, include='dense/')",
                         "--param_group=freeze(include='dense_2/')")  # fmt: skip
        self.assertEqual(result.returncode, 0, context(result))
        rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
        self.assertTrue(rows["sequential/dense/kernel"].endswith("lr×0.1"))
        self.assertTrue(rows["sequential/dense_2/bias"].endswith("frozen"))
        self.assertTrue(rows["sequential/dense_1/kernel"].endswith("-- none --"))
        self.assertIn("apply_gradients -> lr×0.1 (2 variables), frozen (2 variables)",
                      result.stdout)  # fmt: skip


if __name__ == "__main__":
    tf.test.main()
