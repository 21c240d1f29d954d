"""Projections after the optimizer's update: max_norm, unit_norm, non_neg and plugins, against
Keras constraints under `model.fit`, NumPy, skipped steps, replicas, XLA and the CLI."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from array_task import ArrayTask, regression_data
from cli_runner import CliResult, run_cli
from test_penalties import PenaltyTestBase, _run

from trainer import (
    ConfigError,
    DecoupledWeightDecay,
    MaxNorm,
    NonNeg,
    Penalty,
    TrainerOptions,
    UnitNorm,
)
from trainer.distribution import make_strategy
from trainer.step.projection import Projections
from trainer.step.update import OptimizerUpdate

STEPS, BATCH = 50, 16

# (Keras constraint, the same as a tapeloop projection), each made fresh per model. The bound
# 0.5 is below the initial column norms (~0.8), so max_norm acts from the first step.
PAIRS = {
    "max_norm": (lambda: keras.constraints.MaxNorm(0.5), lambda: MaxNorm(0.5)),
    "unit_norm": (lambda: keras.constraints.UnitNorm(), lambda: UnitNorm()),
    "non_neg": (lambda: keras.constraints.NonNeg(), lambda: NonNeg()),
}
OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05),
    "adam": lambda: keras.optimizers.Adam(1e-2),
}


def mlp(constraint=None) -> keras.Model:
    """4 -> Dense(8, tanh) -> Dense(2), optionally with `kernel_constraint=constraint()`."""
    make = constraint or (lambda: None)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh", kernel_constraint=make()),
            keras.layers.Dense(2, kernel_constraint=make()),
        ]
    )


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def column_norms(weights: np.ndarray) -> np.ndarray:
    return np.linalg.norm(weights.astype(np.float64), axis=0)


class Before(Penalty):
    """The wrong variant: a projection done before the optimizer's update, as an `update()`."""

    def __init__(self, projection, **selection):
        super().__init__(**selection)
        self.projection = projection

    def default_selection(self, variable):
        return len(variable.shape) >= 2

    def build(self, variables):
        super().build(variables)
        self.projection.build(variables)

    def update(self, variables, context):
        for v in variables:
            v.assign(self.projection.projected(tf.convert_to_tensor(v)))


class ProjectionTestBase(PenaltyTestBase):
    """A projection's `project` equals the Keras constraint and NumPy on the selection."""

    def keras_constraint(self):
        raise NotImplementedError

    def numpy_projection(self, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def expected_selection(self):
        return ["net/hidden/kernel", "net/out/kernel"]  # ndim >= 2 by default

    @parameterized.named_parameters(("eager", False), ("tf_function", True))
    def test_project_matches_keras_and_numpy(self, use_tf_function):
        before = {v.path: v.numpy() for v in self.model.trainable_variables}
        chosen = {v.path for v in self.selected}
        constraint = self.keras_constraint()
        _run(lambda: self.penalty.project(self.selected), use_tf_function)
        for v in self.model.trainable_variables:
            w = before[v.path]
            if v.path in chosen:
                self.assertAllClose(v.numpy(), constraint(w), rtol=1e-6, atol=0, msg=v.path)
                expected = self.numpy_projection(w.astype(np.float64))
                self.assertAllClose(v.numpy(), expected, rtol=1e-6, atol=1e-7, msg=v.path)
                self.assertGreater(np.max(np.abs(v.numpy() - w)), 1e-2)  # it acted
            else:
                self.assertAllEqual(v.numpy(), w)

    def test_phases(self):
        penalty = self.penalty
        self.assertEqual((penalty.has_loss, penalty.has_update, penalty.has_project),
                         (False, False, True))  # fmt: skip
        self.assertFalse(penalty.decays)


class MaxNormTest(ProjectionTestBase):
    expected_repr = "MaxNorm(max_value=0.5, axis=0)"

    def make_penalty(self):
        return MaxNorm(0.5)

    def keras_constraint(self):
        return keras.constraints.MaxNorm(0.5)

    def numpy_projection(self, w):
        norms = np.sqrt(np.sum(w**2, axis=0, keepdims=True))
        return w * np.clip(norms, 0, 0.5) / (1e-7 + norms)

    def test_max_value_is_a_strength(self):
        """Sweepable without retracing: the bound lives in a variable once built."""
        self.assertLen(self.penalty.state_variables(), 1)
        fn = tf.function(lambda: self.penalty.project(self.selected))
        fn()
        self.penalty.max_value = 0.25
        fn()
        self.assertEqual(fn.experimental_get_tracing_count(), 1)
        for v in self.selected:
            self.assertAllLessEqual(column_norms(v.numpy()), 0.25 * (1 + 1e-6))


class MaxNormAxesTest(ProjectionTestBase):
    """Norms over a list of axes: one norm per row here (Keras' `axis=[1]`)."""

    expected_repr = "MaxNorm(max_value=0.5, axis=(1,), include='kernel')"

    def make_penalty(self):
        return MaxNorm(0.5, axis=[1], include="kernel")

    def keras_constraint(self):
        return keras.constraints.MaxNorm(0.5, axis=[1])

    def numpy_projection(self, w):
        norms = np.sqrt(np.sum(w**2, axis=1, keepdims=True))
        return w * np.clip(norms, 0, 0.5) / (1e-7 + norms)


class UnitNormTest(ProjectionTestBase):
    expected_repr = "UnitNorm(axis=0)"

    def make_penalty(self):
        return UnitNorm()

    def keras_constraint(self):
        return keras.constraints.UnitNorm()

    def numpy_projection(self, w):
        return w / (1e-7 + np.sqrt(np.sum(w**2, axis=0, keepdims=True)))


class NonNegTest(ProjectionTestBase):
    expected_repr = "NonNeg(exclude='out')"

    def make_penalty(self):
        return NonNeg(exclude="out")

    def expected_selection(self):
        return ["net/hidden/kernel"]

    def keras_constraint(self):
        return keras.constraints.NonNeg()

    def numpy_projection(self, w):
        return np.maximum(w, 0)


class ValidationTest(parameterized.TestCase, tf.test.TestCase):
    """Bad arguments fail in the constructor (or at build), naming the argument and value."""

    @parameterized.named_parameters(
        ("zero_max_value", lambda: MaxNorm(0), "`max_value` (0)"),
        ("negative_max_value", lambda: MaxNorm(-1.0), "`max_value` (-1.0)"),
        ("infinite_max_value", lambda: MaxNorm(float("inf")), "`max_value` (inf)"),
        ("nan_max_value", lambda: MaxNorm(float("nan")), "`max_value` (nan)"),
        ("string_max_value", lambda: MaxNorm("big"), "`max_value` ('big')"),
        ("string_axis", lambda: MaxNorm(1.0, axis="0"), "`axis` ('0')"),
        ("float_axis", lambda: UnitNorm(axis=1.5), "`axis` (1.5)"),
        ("bool_axis", lambda: UnitNorm(axis=True), "`axis` (True)"),
        ("empty_axes", lambda: MaxNorm(1.0, axis=[]), "`axis` ([])"),
        ("repeated_axes", lambda: MaxNorm(1.0, axis=[0, 0]), "`axis` ([0, 0])"),
    )
    def test_rejected(self, make, message):
        with self.assertRaises(ConfigError) as cm:
            make()
        self.assertIn(message, str(cm.exception))
        self.assertNotIn("\n", str(cm.exception))

    def test_zero_assignment_rejected(self):
        penalty = MaxNorm(1.0)
        with self.assertRaisesRegex(ConfigError, r"`max_value` \(0\.0\) must be a positive"):
            penalty.max_value = 0.0

    def test_axis_out_of_range_is_refused_at_build(self):
        model = mlp()
        penalty = MaxNorm(1.0, axis=2)
        selected = penalty.select(model.trainable_variables)
        with self.assertRaisesRegex(
            ConfigError, r"MaxNorm\(max_value=1.0, axis=2\): `axis` \(2\) is out of range for "
            r"'sequential.*/kernel' of shape \(4, 8\)"
        ):  # fmt: skip
            penalty.build(selected)


class EquivalenceTestBase(parameterized.TestCase, tf.test.TestCase):
    """Trains from the same initial weights on the same batches, as `test_equivalence.py`."""

    def setUp(self):
        super().setUp()
        self.x, self.y = regression_data(n=80)  # 5 batches of 16 per epoch, 10 epochs = 50 steps
        keras.utils.set_random_seed(1)
        self.init = mlp().get_weights()

    def task(self, optimizer, penalties=(), constraint=None, steps=STEPS, **kwargs):
        options = kwargs.pop("options", {})
        task = ArrayTask(
            self.x,
            self.y,
            TrainerOptions(batch_size=BATCH, train_steps=steps, steps_per_loop=10, **options),
            model_fn=lambda: mlp(constraint),
            optimizer=optimizer,
            penalties=penalties,
            **kwargs,
        )
        task.model.set_weights(self.init)
        return task

    def train(self, optimizer, penalties=(), constraint=None, **kwargs):
        """Trains with tapeloop from `self.init`; returns the final weights."""
        task = self.task(optimizer, penalties, constraint, **kwargs)
        task.train()
        return task.model.get_weights()

    def fit(self, optimizer, constraint):
        """The reference: Keras `model.fit` with `kernel_constraint`, 50 steps, in order."""
        model = mlp(constraint)
        model.set_weights(self.init)
        model.compile(optimizer=optimizer(), loss="mse")
        model.fit(self.x, self.y, batch_size=BATCH, epochs=STEPS * BATCH // len(self.x),
                  shuffle=False, verbose=0)  # fmt: skip
        return model.get_weights()


class KerasConstraintEquivalenceTest(EquivalenceTestBase):
    """`max_norm(c)`, `unit_norm()`, `non_neg()` ≡ Keras `kernel_constraint` under `model.fit`."""

    @parameterized.named_parameters(*[(f"{p}_{o}", p, o) for p in PAIRS for o in OPTIMIZERS])
    def test_projection_matches_model_fit_with_kernel_constraint(self, pair, optimizer):
        """Reference: Keras `model.fit`, 50 steps, ≤ 1e-6 (measured: 0.0, bit-identical).

        The same projection done before the optimizer's update (an `update()` plugin) lands
        more than 5e-3 away (measured, SGD/Adam: max_norm 4.8e-2/8.8e-2, unit_norm
        4.5e-2/1.3e-2, non_neg 0.10/0.23).
        """
        make_constraint, make_projection = PAIRS[pair]
        make_optimizer = OPTIMIZERS[optimizer]
        reference = self.fit(make_optimizer, make_constraint)
        got = self.train(make_optimizer, [make_projection()])
        self.assertLessEqual(max_abs_diff(got, reference), 1e-6)
        before = self.train(make_optimizer, [Before(make_projection())])
        self.assertGreater(max_abs_diff(before, reference), 5e-3)

    @parameterized.named_parameters(("sgd", "sgd"), ("adam", "adam"))
    def test_keras_constraint_on_the_model_matches_model_fit(self, optimizer):
        """A user's `kernel_constraint` is applied as `model.fit` applies it (by the optimizer,
        after its update): ≤ 1e-6 (measured 0.0); unconstrained lands > 0.1 away; the
        coverage table lists the constraint."""
        make_optimizer = OPTIMIZERS[optimizer]
        make_constraint = PAIRS["max_norm"][0]
        reference = self.fit(make_optimizer, make_constraint)
        task = self.task(make_optimizer, constraint=make_constraint)
        task.train()
        self.assertLessEqual(max_abs_diff(task.model.get_weights(), reference), 1e-6)
        self.assertGreater(max_abs_diff(self.train(make_optimizer), reference), 0.1)
        lines = task.penalty_table().splitlines()
        kernels = [line for line in lines if "/kernel " in line]
        self.assertLen(kernels, 2)
        for line in kernels:
            self.assertTrue(line.endswith("keras_constraint"), line)
        self.assertIn(
            "  keras_constraint: 2 variables, 48 parameters  MaxNorm(max_value=0.5, axis=0), "
            "a Keras constraint after the update",
            lines,
        )


class StepTest(EquivalenceTestBase):
    """Where the stage runs: after the update, before the EMA, not on skipped steps, once
    across replicas, and compiled with XLA."""

    def test_a_step_the_loss_scale_optimizer_skips_leaves_the_weights_unchanged(self):
        """A loss scale of 2¹²⁷ overflows: the first step is skipped, projection included
        (bit for bit), though the initial column norms exceed the bound; later steps project."""
        bound = 0.1
        task = ArrayTask(
            self.x,
            self.y * 1e3,
            TrainerOptions(batch_size=BATCH, train_steps=1),
            model_fn=mlp,
            optimizer=lambda: keras.optimizers.LossScaleOptimizer(
                keras.optimizers.SGD(1e-9), initial_scale=2.0**127
            ),
            penalties=[MaxNorm(bound)],
        )
        before = task.model.get_weights()
        self.assertGreater(np.max(column_norms(before[0])), 5 * bound)  # it would act
        iterator = iter(task.train_dataset())
        task.train_loop.run(1, iterator)
        self.assertEqual(int(task.optimizer.iterations), 0)
        for got, expected in zip(task.model.get_weights(), before):
            self.assertAllEqual(got, expected)
        for _ in range(20):  # the scale halves on each skipped step until gradients are finite
            task.train_loop.run(1, iterator)
        self.assertGreater(int(task.optimizer.iterations), 0)
        for kernel in task.model.get_weights()[::2]:
            self.assertAllLessEqual(column_norms(kernel), bound * (1 + 1e-6))

    def test_the_ema_averages_projected_weights(self):
        """After one step the EMA is the weights (Keras' first-step rule): the projected ones."""
        task = self.task(OPTIMIZERS["adam"], [MaxNorm(0.5)], steps=1, options={"ema_decay": 0.9})
        task.train()
        raw = task.model.get_weights()
        with task.evaluated_weights():
            averaged = task.model.get_weights()
        for a, b in zip(averaged, raw):
            self.assertAllEqual(a, b)
        self.assertAllLessEqual(column_norms(averaged[0]), 0.5 * (1 + 1e-6))

    def test_two_replicas_match_one_device(self):
        """MirroredStrategy on 2 logical CPUs ≡ one device with the same global batch, 20 Adam
        steps of max_norm + decoupled decay: ≤ 1e-6 of each tensor's largest weight (a few
        ulps; measured 4.5e-8 absolute), and the replicas' copies are bit-identical."""
        penalties = lambda: [MaxNorm(0.5), DecoupledWeightDecay(0.05)]  # noqa: E731
        one = self.train(OPTIMIZERS["adam"], penalties(), steps=20)
        mirrored = make_strategy("mirrored", cpu_replicas=2)
        task = self.task(OPTIMIZERS["adam"], penalties(), steps=20, strategy=mirrored)
        task.train()
        two = task.model.get_weights()
        for a, b in zip(one, two):
            self.assertLessEqual(np.max(np.abs(a - b)), 1e-6 * np.max(np.abs(a)))
        for kernel in two[::2]:
            self.assertAllLessEqual(column_norms(kernel), 0.5 * (1 + 1e-6))
        for v in task.model.trainable_variables:
            first, *others = [c.numpy() for c in v.value.values]
            self.assertLen(others, 1)
            for other in others:
                self.assertAllEqual(first, other)

    def test_compiled_with_xla(self):
        """The in-memory loop under XLA projects as the plain `tf.function` one: ≤ 1e-6
        relative to each tensor's largest weight."""

        class InMemory(ArrayTask):
            def train_arrays(self):
                return self.x, self.y

        results = []
        for jit_compile in (True, False):
            task = InMemory(
                self.x,
                self.y,
                TrainerOptions(batch_size=BATCH, train_steps=20, steps_per_loop=10,
                               jit_compile=jit_compile),
                model_fn=mlp,
                optimizer=OPTIMIZERS["adam"],
                penalties=[MaxNorm(0.5), NonNeg(include=lambda v: tuple(v.shape) == (8, 2))],
            )  # fmt: skip
            task.model.set_weights(self.init)
            task.train()
            self.assertEqual(task.train_loop.xla, jit_compile)
            results.append(task.model.get_weights())
        xla, plain = results
        for a, b in zip(xla, plain):
            self.assertLessEqual(np.max(np.abs(a - b)), 1e-6 * np.max(np.abs(b)))
        self.assertAllLessEqual(column_norms(xla[0]), 0.5 * (1 + 1e-6))
        self.assertAllGreaterEqual(xla[2], 0.0)

    def test_off_adds_no_op(self):
        """Without projecting penalties the chain has no projection stage, and the update
        stage reads no `iterations` for one: the step is the plain one."""
        optimizer = lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())  # noqa: E731
        chain = self.task(optimizer, [DecoupledWeightDecay(1e-3)]).built.chain
        self.assertIsNone(chain.stage(Projections))
        self.assertFalse(chain.stage(OptimizerUpdate).record_iterations)
        projected = self.task(optimizer, [MaxNorm(0.5)]).built.chain
        self.assertIsNotNone(projected.stage(Projections))
        self.assertTrue(projected.stage(OptimizerUpdate).record_iterations)

    def test_the_table_marks_projections(self):
        task = self.task(OPTIMIZERS["sgd"], [MaxNorm(0.5)])
        self.assertIn(
            "  max_norm: 2 variables, 48 parameters  MaxNorm(max_value=0.5, axis=0), "
            "a projection after the update",
            task.penalty_table().splitlines(),
        )


def run_norm_check(*flags: str, bound: float) -> CliResult:
    """`python -m trainer --import=maxnorm_plugin --task=norm_check FLAGS`, steps of one, in
    this process."""
    with mock.patch.dict(os.environ, {"NORM_CHECK_MAX": repr(bound)}):
        return run_cli(
            "--import=maxnorm_plugin",
            "--task=norm_check",
            "--steps_per_loop=1",
            "--train_steps=10",
            "--learning_rate=0.05",
            *flags,
        )


class PluginCliTest(parameterized.TestCase):
    """A max-norm plugin written as README's `elastic_net` (implementing `project()`), from the
    CLI: every column of every kernel is within the bound after every step, beside a decay."""

    @parameterized.named_parameters(
        ("with_decoupled_decay", "--optimizer=adam", "--penalty=decoupled_weight_decay(1e-2)"),
        ("with_adamw", "--optimizer=adamw", "--penalty=loss_only(1e-3)"),
    )
    def test_max_norm_plugin_bounds_every_step(self, *flags):
        bound = 0.5
        result = run_norm_check("--penalty=max_norm_test(0.5)", *flags, bound=bound)
        context = f"\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"
        self.assertEqual(result.returncode, 0, context)
        line = next(
            (x for x in result.stdout.splitlines() if x.startswith("largest column norm")), ""
        )
        self.assertTrue(line, context)
        ratio = float(line.split(":")[1])
        # Within the bound at every step (the hook raises otherwise), and at it: it acted.
        self.assertBetween(ratio, 1 - 1e-3, 1 + 1e-6)
        if "--penalty=loss_only(1e-3)" in flags:  # a loss-only plugin with no declarations
            self.assertIn("penalty/loss_only=", result.stdout, context)


if __name__ == "__main__":
    tf.test.main()
