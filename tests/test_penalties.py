"""Every penalty's value, gradient and update against NumPy, eagerly and under tf.function."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import re

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from array_task import small_model

from tasks.example_penalties import L1, L2SP
from trainer import (
    L2,
    ConfigError,
    DecoupledWeightDecay,
    Penalty,
    SelectiveL2,
    StepContext,
    Strength,
)
from trainer.numerics import square_sum_2x, upstream_after
from trainer.penalties.coverage import coverage

MODES = (("eager", False), ("tf_function", True))


def _run(fn, use_tf_function):
    return tf.function(fn)() if use_tf_function else fn()


class PenaltyTestBase(parameterized.TestCase, tf.test.TestCase):
    """Shared checks; subclasses give `make_penalty()` and the NumPy references."""

    __test__ = False  # only concrete subclasses run

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__test__ = not cls.__name__.endswith("Base")

    def make_penalty(self):
        raise NotImplementedError

    def expected_selection(self) -> list[str]:
        """Paths of `small_model()` variables the penalty selects."""
        raise NotImplementedError

    def setUp(self):
        super().setUp()
        tf.keras.utils.set_random_seed(7)
        self.model = small_model()
        # Non-default values everywhere, so that a wrong selection changes the numbers.
        rng = np.random.RandomState(3)
        for v in self.model.trainable_variables:
            v.assign(rng.randn(*v.shape).astype(np.float32))
        self.penalty = self.make_penalty()
        self.selected = self.penalty.select(self.model.trainable_variables)
        self.penalty.build(self.selected)

    def test_selection(self):
        """The penalty resolves exactly the expected variables, in model order."""
        self.assertEqual([v.path for v in self.selected], self.expected_selection())

    def test_repr_round_trips_the_arguments(self):
        """`repr` shows the class and the arguments as typed (float32 noise hidden)."""
        self.assertEqual(repr(self.penalty), self.expected_repr)


class LossPenaltyTestBase(PenaltyTestBase):
    """Loss penalties: value and gradient equal a NumPy reference."""

    def numpy_loss(self, weights: list[np.ndarray]) -> float:
        raise NotImplementedError

    def numpy_gradient(self, weight: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @parameterized.named_parameters(*MODES)
    def test_value_matches_numpy(self, use_tf_function):
        """The loss term equals the NumPy formula on the selected weights."""
        value = _run(lambda: self.penalty.loss(self.selected), use_tf_function)
        expected = self.numpy_loss([v.numpy() for v in self.selected])
        self.assertAllClose(value, expected, rtol=1e-6)
        self.assertEqual(value.dtype, tf.float32)

    @parameterized.named_parameters(*MODES)
    def test_gradient_matches_numpy(self, use_tf_function):
        """d(loss)/dw equals the NumPy derivative for selected weights and is 0 elsewhere."""
        variables = self.model.trainable_variables

        def gradients():
            with tf.GradientTape() as tape:
                loss = self.penalty.loss(self.selected)
            # Not UnconnectedGradients.ZERO: it fails on Keras 3 variables (string dtypes).
            grads = tape.gradient(loss, variables)
            return [tf.zeros(v.shape) if g is None else g for v, g in zip(variables, grads)]

        grads = _run(gradients, use_tf_function)
        selected = {v.path for v in self.selected}
        for v, g in zip(variables, grads):
            expected = self.numpy_gradient(v.numpy()) if v.path in selected else 0 * v.numpy()
            self.assertAllClose(g, expected, rtol=1e-6, msg=v.path)

    def test_empty_selection_is_zero(self):
        """Sonnet's convention: a loss over no variables is 0, not an error inside the graph."""
        self.assertEqual(float(self.penalty.loss([])), 0.0)

    def test_strength_change_changes_value_without_retracing(self):
        """Strengths live in variables: a new λ gives a new value from the same trace."""
        fn = tf.function(lambda: self.penalty.loss(self.selected))
        before = float(fn())
        self.penalty.scale = self.penalty.scale * 3
        self.assertAllClose(fn(), 3 * before, rtol=1e-6)
        self.assertEqual(fn.experimental_get_tracing_count(), 1)


class L2Test(LossPenaltyTestBase):
    expected_repr = "L2(scale=0.01)"

    def make_penalty(self):
        return L2(0.01)

    def expected_selection(self):
        return [v.path for v in self.model.trainable_variables]

    def numpy_loss(self, weights):
        return 0.01 * sum(np.sum(w.astype(np.float64) ** 2) for w in weights)

    def numpy_gradient(self, weight):
        return 2 * 0.01 * weight


class SquareSumTest(parameterized.TestCase, tf.test.TestCase):
    """`square_sum_2x`, L2's Σw² with a written-out gradient and a matrix-vector reduction."""

    SHAPES = ((), (5,), (7, 3), (3, 3, 4, 8), (2, 3, 1, 5))

    @parameterized.named_parameters(("eager", None), ("tf_function", False), ("xla", True))
    def test_value_gradient_and_second_derivative_match_numpy(self, jit_compile):
        """Σx², its gradient 2x and the Hessian-vector product 2v, for ranks 0 to 4."""
        rng = np.random.RandomState(0)
        for shape in self.SHAPES:
            x = tf.constant(np.asarray(rng.randn(*shape), np.float32))
            v = tf.constant(np.asarray(rng.randn(*shape), np.float32))

            def derivatives(x=x, v=v):
                with tf.GradientTape() as outer:
                    outer.watch(x)
                    with tf.GradientTape() as inner:
                        inner.watch(x)
                        value = square_sum_2x(x)
                    gradient = inner.gradient(value, x)
                    directional = tf.reduce_sum(gradient * v)
                return value, gradient, outer.gradient(directional, x)

            if jit_compile is not None:
                derivatives = tf.function(derivatives, jit_compile=jit_compile)
            value, gradient, hvp = derivatives()
            x64 = x.numpy().astype(np.float64)
            self.assertAllClose(value, np.sum(x64**2), rtol=1e-6, msg=str(shape))
            self.assertAllClose(gradient, 2 * x.numpy(), rtol=1e-6, msg=str(shape))
            self.assertAllClose(hvp, 2 * v.numpy(), rtol=1e-6, msg=str(shape))


class UpstreamAfterTest(tf.test.TestCase):
    """`upstream_after`: gradients, hence in-place updates, after the loss terms' values."""

    def loop_hlo(self, ordered):
        """XLA's optimized HLO of 3 Adam steps in a while loop, summing the loss, with an
        L1-style term (Σ|w|, read from the kernel like any user penalty)."""
        kernel = tf.Variable(tf.random.normal([64, 48], seed=1))
        x = tf.random.normal([32, 64], seed=2)
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build([kernel])

        @tf.function(jit_compile=True)
        def steps():
            def body(i, total):
                with tf.GradientTape() as tape:
                    term = 1e-4 * tf.reduce_sum(tf.abs(kernel))
                    loss = tf.reduce_mean(tf.square(x @ kernel)) + term
                upstream = upstream_after([term]) if ordered else None
                optimizer.apply_gradients(zip(tape.gradient(loss, [kernel], upstream), [kernel]))
                return i + 1, total + loss

            return tf.while_loop(lambda i, _: i < 3, body, [0, 0.0])[1]

        return steps.experimental_get_compiler_ir()(stage="optimized_hlo")

    def test_xla_copies_no_weight_a_term_reads(self):
        """Ordered, the kernel is never copied; unordered (the wrong variant), XLA copies it
        on every step in case the term's Σ|w| ran after the update."""
        kernel_copy = r"f32\[64,48\]\{1,0\} copy\("
        self.assertEmpty(re.findall(kernel_copy, self.loop_hlo(ordered=True)))
        self.assertNotEmpty(re.findall(kernel_copy, self.loop_hlo(ordered=False)))

    def test_gradients_unchanged_and_nan_after_a_nonfinite_term(self):
        """Finite terms: the same gradients, bit for bit. A non-finite term: NaN gradients
        (in a train step the term makes the loss non-finite too, and the loop stops)."""
        w = tf.Variable(np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4))
        for scale, expect_nan in ((1e-2, False), (np.float32(np.inf), True)):
            with tf.GradientTape(persistent=True) as tape:
                term = scale * tf.reduce_sum(tf.square(w))
                loss = tf.reduce_sum(tf.sin(w)) + tf.where(tf.math.is_finite(term), term, 0.0)
            plain = tape.gradient(loss, w)
            ordered = tape.gradient(loss, w, upstream_after([term]))
            if expect_nan:
                self.assertTrue(np.isnan(ordered.numpy()).all())
            else:
                self.assertAllEqual(ordered, plain)
        self.assertIsNone(upstream_after([]))


class SelectiveL2ExcludeTest(LossPenaltyTestBase):
    expected_repr = "SelectiveL2(scale=0.0001, exclude='bias|norm')"

    def make_penalty(self):
        return SelectiveL2(1e-4, exclude="bias|norm")

    def expected_selection(self):
        return ["net/hidden/kernel", "net/out/kernel"]

    def numpy_loss(self, weights):
        return 1e-4 * sum(np.sum(w.astype(np.float64) ** 2) for w in weights)

    def numpy_gradient(self, weight):
        return 2e-4 * weight


class SelectiveL2IncludeTest(SelectiveL2ExcludeTest):
    expected_repr = "SelectiveL2(scale=0.0001, include='hidden', exclude='bias')"

    def make_penalty(self):
        return SelectiveL2(1e-4, include="hidden", exclude="bias")

    def expected_selection(self):
        return ["net/hidden/kernel"]


class L1Test(LossPenaltyTestBase):
    """The L1 plugin example (`tasks/example_penalties.py`): `scale·Σ|w|`, gradient
    `scale·sign(w)`."""

    expected_repr = "L1(scale=0.001, exclude='norm')"

    def make_penalty(self):
        return L1(1e-3, exclude="norm")

    def expected_selection(self):
        return ["net/hidden/kernel", "net/hidden/bias", "net/out/kernel", "net/out/bias"]

    def numpy_loss(self, weights):
        return 1e-3 * sum(np.sum(np.abs(w.astype(np.float64))) for w in weights)

    def numpy_gradient(self, weight):
        return 1e-3 * np.sign(weight)


class L2SPTest(LossPenaltyTestBase):
    """The L2-SP plugin example: `scale·Σ‖w − w₀‖²` toward the weights at selection."""

    expected_repr = "L2SP(scale=0.1)"

    def make_penalty(self):
        return L2SP(0.1)

    def setUp(self):
        super().setUp()
        self.anchors = {v.path: v.numpy().astype(np.float64) for v in self.selected}
        rng = np.random.RandomState(4)
        for v in self.model.trainable_variables:  # move away from the anchors
            v.assign(v.numpy() + rng.randn(*v.shape).astype(np.float32))

    def expected_selection(self):
        return ["net/hidden/kernel", "net/out/kernel"]

    def numpy_loss(self, weights):
        anchors = [self.anchors[v.path] for v in self.selected]
        return 0.1 * sum(np.sum((w - a) ** 2) for w, a in zip(weights, anchors))

    def numpy_gradient(self, weight):
        anchor = next(self.anchors[v.path] for v in self.selected if v.shape == weight.shape)
        return 0.2 * (weight - anchor)

    def test_anchors_are_checkpointed_state(self):
        self.assertLen(self.penalty.state_variables(), 3)  # the scale and two anchors


class DecoupledWeightDecayTest(PenaltyTestBase):
    """`w ← w − decay·w` on the selected weights only, decay per coupling (NumPy reference)."""

    expected_repr = "DecoupledWeightDecay(rate=0.004)"

    def make_penalty(self):
        return DecoupledWeightDecay(4e-3)

    def expected_selection(self):
        # Default: ndim >= 2, so kernels and not biases or the norm's gamma/beta.
        return ["net/hidden/kernel", "net/out/kernel"]

    def test_not_a_loss_term(self):
        """Decoupled decay never enters the loss (it would be rescaled by Adam if it did)."""
        self.assertFalse(self.penalty.has_loss)
        self.assertTrue(self.penalty.has_update)

    @parameterized.named_parameters(
        ("learning_rate_eager", "learning_rate", False, 0.05 * 4e-3),
        ("learning_rate_tf_function", "learning_rate", True, 0.05 * 4e-3),
        ("schedule", "schedule", True, 0.5 * 4e-3),
        ("absolute", "absolute", True, 4e-3),
    )
    def test_update_matches_numpy(self, coupling, use_tf_function, decay):
        """One update multiplies selected weights by (1 − decay) and leaves the rest alone."""
        penalty = DecoupledWeightDecay(4e-3, coupling=coupling)
        selected = penalty.select(self.model.trainable_variables)
        penalty.build(selected)
        before = {v.path: v.numpy() for v in self.model.trainable_variables}
        context = StepContext(learning_rate=tf.constant(0.05), schedule_multiplier=tf.constant(0.5))
        _run(lambda: penalty.update(selected, context), use_tf_function)
        chosen = {v.path for v in selected}
        for v in self.model.trainable_variables:
            factor = 1 - decay if v.path in chosen else 1.0
            self.assertAllClose(v.numpy(), before[v.path] * factor, rtol=1e-6, msg=v.path)


class TwoStrengths(Penalty):
    """A plugin in the simplest form: strengths read as attributes inside `loss`."""

    l1 = Strength()
    l2 = Strength()

    def __init__(self, l1=1e-3, l2=1e-2, **selection):
        super().__init__(**selection)
        self.l1, self.l2 = l1, l2

    def loss(self, variables):
        return tf.add_n(
            [self.l1 * tf.reduce_sum(tf.abs(v)) + self.l2 * tf.reduce_sum(tf.square(v))
             for v in variables]
        )  # fmt: skip


class PluginApiTest(parameterized.TestCase, tf.test.TestCase):
    """What a plugin author relies on: strengths as attributes, `**selection`, declarations."""

    def setUp(self):
        super().setUp()
        self.model = small_model()
        self.variables = self.model.trainable_variables

    def test_select_is_a_pure_query_and_build_makes_the_state(self):
        penalty = TwoStrengths(exclude="bias|norm")
        selected = penalty.select(self.variables)
        self.assertEqual([v.path for v in selected], ["net/hidden/kernel", "net/out/kernel"])
        self.assertFalse(penalty.built)
        self.assertEqual(penalty.state_variables(), [])
        penalty.build(selected)
        self.assertLen(penalty.state_variables(), 2)

    def test_strengths_read_as_variables_when_compiled_and_floats_outside(self):
        """`self.l1 * ...` in a traced loss follows later assignments without retracing."""
        penalty = TwoStrengths(name="elastic", include="kernel")
        selected = penalty.select(self.variables)
        penalty.build(selected)
        weights = [v.numpy().astype(np.float64) for v in selected]

        def numpy_loss(l1, l2):
            return sum(l1 * np.abs(w).sum() + l2 * (w**2).sum() for w in weights)

        fn = tf.function(lambda: penalty.loss(selected))
        self.assertAllClose(fn(), numpy_loss(1e-3, 1e-2), rtol=1e-6)
        penalty.l1, penalty.l2 = 0.5, 0.0
        self.assertAllClose(fn(), numpy_loss(0.5, 0.0), rtol=1e-6)
        self.assertAllClose(penalty.loss(selected), numpy_loss(0.5, 0.0), rtol=1e-6)
        self.assertEqual(fn.experimental_get_tracing_count(), 1)
        self.assertIsInstance(penalty.l1, float)
        self.assertEqual(penalty.params(), {"l1": 0.5, "l2": 0.0})
        self.assertEqual(
            repr(penalty), "TwoStrengths(l1=0.5, l2=0.0, include='kernel', name='elastic')"
        )

    def test_strength_read_in_a_function_before_build_is_an_error(self):
        """Unbuilt, the value would be frozen into the graph: say so instead."""
        penalty = TwoStrengths()
        with self.assertRaisesRegex(
            RuntimeError, r"TwoStrengths.l1 .*before the penalty was built"
        ):
            tf.function(lambda: penalty.loss(self.variables))()

    def test_phases_are_inferred_from_the_methods_overridden(self):
        """A loss-only plugin needs no declaration; a subclass inherits its base's phases."""
        phases = lambda cls: (cls.has_loss, cls.has_update, cls.has_project)  # noqa: E731
        self.assertEqual(phases(TwoStrengths), (True, False, False))
        self.assertEqual(phases(L2), (True, False, False))
        self.assertEqual(phases(SelectiveL2), (True, False, False))  # inherited from L2
        self.assertEqual(phases(DecoupledWeightDecay), (False, True, False))

        class Both(TwoStrengths):
            def project(self, variables):
                pass

        self.assertEqual(phases(Both), (True, False, True))
        self.assertEqual(phases(Penalty), (False, False, False))
        penalty = TwoStrengths()
        selected = penalty.select(self.variables)
        penalty.build(selected)
        self.assertEqual(penalty.loss(selected).dtype, tf.float32)

    def test_a_consistent_declaration_is_accepted(self):
        class Declared(Penalty):
            has_loss = True
            has_update = False

            def loss(self, variables):
                return tf.constant(0.0)

        self.assertEqual((Declared.has_loss, Declared.has_update), (True, False))
        Declared()

    def test_an_inconsistent_declaration_is_refused_at_class_definition(self):
        with self.assertRaisesRegex(
            TypeError, r"^Missing declares `has_update = True` but does not override update\(\)"
        ):

            class Missing(Penalty):
                has_update = True

                def loss(self, variables):
                    return tf.constant(0.0)

        with self.assertRaisesRegex(
            TypeError, r"^Denied declares `has_loss = False` but overrides loss\(\)"
        ):

            class Denied(L2):
                has_loss = False

    def test_a_class_with_no_phase_is_refused(self):
        """An abstract intermediate class is fine; instantiating one with no phase is not."""

        class Neither(Penalty):
            scale = Strength()

        with self.assertRaisesRegex(
            TypeError, r"^Neither must implement loss\(\), update\(\) or project\(\)"
        ):
            Neither()

    def test_spec_errors_list_the_selection_keywords(self):
        """`**selection` is shown as the keywords it accepts, and a typo is one line."""
        from trainer import parse_penalty_spec

        with self.assertRaisesRegex(ConfigError, r"'inclde'.*l1\(scale=1e-05, \*, include=None"):
            parse_penalty_spec("l1(1e-3, inclde='kernel')")
        penalty = parse_penalty_spec("l1(1e-3, include='kernel', name='l1_kernels')")
        self.assertEqual(repr(penalty), "L1(scale=0.001, include='kernel', name='l1_kernels')")


class UserDecay(Penalty):
    """A plugin that decays its variables (`w ← (1 − rate)·w`) and says so."""

    rate = Strength()
    decays = True

    def __init__(self, rate=1e-2, **selection):
        super().__init__(**selection)
        self.rate = rate

    def update(self, variables, context):
        for v in variables:
            v.assign_sub(self.rate * v)


class RescaleUpdate(Penalty):
    """A direct update that is not a decay: each column rescaled to norm ≤ 1."""

    def update(self, variables, context):
        for v in variables:
            v.assign(tf.clip_by_norm(v, 1.0, axes=[0]))


class DecaysTest(parameterized.TestCase, tf.test.TestCase):
    """Only decays count for the "decayed twice" refusal: `decays`, not any `update()`."""

    def check(self, penalties, optimizer=None):
        variables = small_model().trainable_variables
        selections = [(p, p.select(variables)) for p in penalties]
        return coverage(selections, optimizer or keras.optimizers.Adam(), variables)

    def test_decays_is_declared_and_inherited(self):
        class MyDecay(DecoupledWeightDecay):
            pass

        self.assertEqual(
            [c.decays for c in (Penalty, L2, DecoupledWeightDecay, MyDecay, RescaleUpdate)],
            [False, False, True, True, False],
        )

    @parameterized.named_parameters(
        ("plugin_and_decoupled", [UserDecay(include="out"), DecoupledWeightDecay(1e-2)], None,
         r"'net/out/kernel' would be decayed twice, by UserDecay\(rate=0.01, include='out'\) "
         r"and by DecoupledWeightDecay\(rate=0.01\)"),
        ("plugin_and_adamw", [UserDecay()], keras.optimizers.AdamW,
         r"'net/hidden/kernel' would be decayed twice, by UserDecay\(rate=0.01\) and by "
         r"AdamW\(weight_decay=0.004\), the optimizer's own"),
    )  # fmt: skip
    def test_two_decays_are_refused(self, penalties, make_optimizer, message):
        with self.assertRaisesRegex(ConfigError, message):
            self.check(penalties, make_optimizer and make_optimizer())

    @parameterized.named_parameters(
        ("with_decoupled", None, [DecoupledWeightDecay(1e-2)]),
        ("with_adamw", keras.optimizers.AdamW, []),
    )
    def test_an_update_that_is_not_a_decay_is_accepted(self, make_optimizer, others):
        entries = self.check([RescaleUpdate(), *others], make_optimizer and make_optimizer())
        self.assertEqual([e.decays for e in entries], [False, True])


class ValidationTest(parameterized.TestCase):
    """Bad arguments fail in the constructor with the argument's name and value."""

    @parameterized.named_parameters(
        ("negative_scale", lambda: L2(-1.0), "`scale` (-1.0)"),
        ("nan_scale", lambda: L2(float("nan")), "`scale` (nan)"),
        ("string_scale", lambda: L2("big"), "`scale` ('big')"),
        ("bool_scale", lambda: L2(True), "`scale` (True)"),
        ("negative_rate", lambda: DecoupledWeightDecay(-0.1), "`rate` (-0.1)"),
        ("bad_coupling", lambda: DecoupledWeightDecay(0.1, coupling="lr"), "`coupling` ('lr')"),
        ("bad_regex", lambda: SelectiveL2(0.1, include="("), "`include` ('(')"),
        ("bad_selector", lambda: L2(0.1, exclude=3), "`exclude` (3)"),
        ("selective_without_selection", lambda: SelectiveL2(0.1), "use L2"),
    )
    def test_rejected(self, make, message):
        with self.assertRaises(ConfigError) as cm:
            make()
        self.assertIn(message, str(cm.exception))

    def test_negative_scale_assignment_rejected(self):
        penalty = L2(0.1)
        with self.assertRaisesRegex(ConfigError, r"`scale` \(-2\)"):
            penalty.scale = -2
        self.assertAlmostEqual(penalty.scale, 0.1, places=6)


if __name__ == "__main__":
    tf.test.main()
