"""Strength schedules: logged values against the closed form, decay and plugins against
hand-written SGD, resume, sweeps without retracing, bad specs."""

import json
import math
import os

import keras
import numpy as np
import tensorflow as tf
from array_task import ArrayTask, regression_data
from cli_runner import CliTestCase, run_cli
from test_tensorboard import read_events

from trainer import (
    L2,
    ConfigError,
    DecoupledWeightDecay,
    Penalty,
    SelectiveL2,
    Strength,
    StrengthSchedule,
    TrainerOptions,
    parse_penalty_spec,
    register_penalty,
)
from trainer.cli.sweep import parse_sweep, run_sweep
from trainer.run import resume


def multiplier(kind, step, ratio=0.0, steps=20, warmup=0, start_step=0):
    """The schedule's multiplier in float64, written from its docstring's formulas (with
    Keras' `0.5 (1 + cos(π f))` for the cosine)."""
    s = max(step - start_step, 0)
    if s < warmup:
        return s / warmup
    decay_steps = max(steps - warmup, 1)
    f = (min(s, warmup + decay_steps) - warmup) / decay_steps
    if kind == "cosine":
        return (1 - ratio) * 0.5 * (1 + math.cos(math.pi * f)) + ratio
    if kind == "linear":
        return (1 - ratio) * (1 - f) + ratio
    return 1.0


def linear_model():
    """4 -> Dense(2): with `sum_outputs` as the loss, the kernel's gradient is the mean input."""
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="out")], name="lin")


def sum_outputs(labels, outputs):
    del labels
    return tf.reduce_sum(outputs, axis=-1)


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


class Tilt(Penalty):
    """A plugin with its own strength: `alpha · Σ w` (its gradient is `alpha` everywhere)."""

    alpha = Strength()

    def __init__(self, alpha=0.1, **selection):
        super().__init__(**selection)
        self.alpha = alpha

    def loss(self, variables):
        return self.alpha * tf.add_n([tf.reduce_sum(v) for v in variables])


register_penalty("schedule_test_tilt")(Tilt)


class TwoStrengths(Tilt):
    beta = Strength()

    def __init__(self, alpha=0.1, beta=0.2, **selection):
        super().__init__(alpha, **selection)
        self.beta = beta


class ScheduleTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.x, cls.y = regression_data(n=64)

    def task(self, penalties, model_dir=None, **options):
        defaults = {"batch_size": 16, "train_steps": 20, "steps_per_loop": 10,
                    "summary_every": 1, "learning_rate": 0.05, "model_dir": model_dir}  # fmt: skip
        return ArrayTask(self.x, self.y, TrainerOptions(**{**defaults, **options}),
                         penalties=penalties)  # fmt: skip

    def test_cosine_logged_values_match_the_closed_form(self):
        """`strength/<p>.<name>` at step n is the closed form at n (the next update's value,
        as `learning_rate`; `decay/<name>` agrees); the variable holds the last update's value
        (step 19)."""
        model_dir = self.create_tempdir().full_path
        l2 = L2(1e-2, schedule="cosine(end=1e-3, warmup=4)")
        decay = DecoupledWeightDecay(0.1, schedule="linear(end=0.02, steps=10, start_step=5)")
        task = self.task([l2, decay], model_dir)
        task.train()
        scalars, _, _ = read_events(model_dir)
        self.assertEqual({t for t in scalars if t.startswith("strength/")},
                         {"strength/l2.scale", "strength/decoupled_weight_decay.rate"})  # fmt: skip
        logged = dict(scalars["strength/l2.scale"])
        self.assertEqual(sorted(logged), list(range(1, 21)))
        for step, value in logged.items():
            expected = 1e-2 * multiplier("cosine", step, ratio=0.1, warmup=4)
            self.assertAllClose(value, expected, rtol=1e-6, atol=0, msg=f"step {step}")
        decays = dict(scalars["decay/decoupled_weight_decay"])  # lr · rate, at the same step
        for step, value in scalars["strength/decoupled_weight_decay.rate"]:
            expected = 0.1 * multiplier("linear", step, ratio=0.2, steps=10, start_step=5)
            self.assertAllClose(value, expected, rtol=1e-6, atol=0, msg=f"step {step}")
            self.assertAllClose(decays[step], 0.05 * expected, rtol=1e-6, atol=0)
        in_force = 1e-2 * multiplier("cosine", 19, ratio=0.1, warmup=4)
        self.assertAllClose(l2.strength("scale").numpy(), in_force, rtol=1e-6, atol=0)
        self.assertAllClose(l2.scale, in_force, rtol=1e-6, atol=0)  # read in Python
        self.assertEqual(l2.params()["scale"], 1e-2)  # shown and recorded: the base

    def test_decoupled_weight_decay_schedule_matches_add_decayed_weights_by_hand(self):
        """SGD + scheduled decay ≡ optax's `add_decayed_weights(schedule)` then SGD, in NumPy:
        `w ← w − lr·rate_t·w − lr·g`, rate_t at the step before the update (0 first)."""
        lr, rate, steps = 0.1, 0.5, 20
        for compiled in (True, False):
            with self.subTest(use_tf_function=compiled):
                decay = DecoupledWeightDecay(rate, schedule="cosine(end=0.05)")
                task = ArrayTask(self.x, self.y,
                                 TrainerOptions(batch_size=64, train_steps=steps,
                                                steps_per_loop=10, learning_rate=lr,
                                                optimizer="sgd", use_tf_function=compiled),
                                 model_fn=linear_model, loss_fn=sum_outputs,
                                 penalties=[decay])  # fmt: skip
                kernel, bias = (w.astype(np.float64) for w in task.model.get_weights())
                gradient = np.repeat(self.x.astype(np.float64).mean(0)[:, None], 2, axis=1)
                for step in range(steps):
                    rate_t = rate * multiplier("cosine", step, ratio=0.1, steps=steps)
                    kernel = kernel - lr * rate_t * kernel - lr * gradient
                bias = bias - lr * steps * 1.0
                task.train()
                trained_kernel, trained_bias = task.model.get_weights()
                self.assertLess(relative_error(trained_kernel, kernel), 1e-6)
                self.assertLess(relative_error(trained_bias, bias), 1e-6)

    def test_plugin_penalty_takes_a_schedule_unchanged(self):
        """A plugin written without schedules in mind: its `loss()` reads the scheduled value
        (SGD weights ≡ NumPy), from a spec and from a `StrengthSchedule` object."""
        lr, steps = 0.1, 10
        for schedule in ("linear(end=0.05)", StrengthSchedule("linear", end=0.05)):
            with self.subTest(schedule=schedule):
                if isinstance(schedule, str):
                    tilt = parse_penalty_spec(
                        f"schedule_test_tilt(0.5, include='kernel', schedule={schedule!r})"
                    )
                else:
                    tilt = Tilt(0.5, include="kernel", schedule=schedule)
                expected = "Tilt(alpha=0.5, schedule='linear(end=0.05)', include='kernel')"
                self.assertEqual(repr(tilt), expected)
                task = ArrayTask(self.x, self.y,
                                 TrainerOptions(batch_size=64, train_steps=steps,
                                                steps_per_loop=steps, learning_rate=lr,
                                                optimizer="sgd"),
                                 model_fn=linear_model, loss_fn=sum_outputs,
                                 penalties=[tilt])  # fmt: skip
                kernel = task.model.get_weights()[0].astype(np.float64)
                gradient = np.repeat(self.x.astype(np.float64).mean(0)[:, None], 2, axis=1)
                for step in range(steps):
                    alpha_t = 0.5 * multiplier("linear", step, ratio=0.1, steps=steps)
                    kernel = kernel - lr * (gradient + alpha_t)
                task.train()
                self.assertLess(relative_error(task.model.get_weights()[0], kernel), 1e-6)

    def test_resume_continues_the_schedule(self):
        """10 steps, then a resume to 20: the logged values and weights ≡ 20 steps at once;
        the same schedule is no change on resume, another one is logged as one."""
        spec = "cosine(end=1e-3, steps=20)"
        whole_dir = self.create_tempdir().full_path
        whole = self.task([L2(1e-2, schedule=spec)], whole_dir)
        whole.train()
        split_dir = self.create_tempdir().full_path
        self.task([L2(1e-2, schedule=spec)], split_dir, train_steps=10).train()
        resumed = self.task([L2(1e-2, schedule=spec)], split_dir)
        resumed.train()
        logged = [dict(read_events(d)[0]["strength/l2.scale"]) for d in (whole_dir, split_dir)]
        self.assertEqual(sorted(logged[1]), list(range(1, 21)))
        for step in range(11, 21):
            self.assertAllClose(logged[1][step], logged[0][step], rtol=1e-6, atol=0)
        for a, b in zip(resumed.model.get_weights(), whole.model.get_weights(), strict=True):
            self.assertAllClose(a, b, rtol=1e-6, atol=0)
        with open(os.path.join(split_dir, "tapeloop.json")) as f:
            saved = json.load(f)["settings"]
        self.assertFalse([c for c in resume.changes(saved, resume.settings(resumed)) if "l2." in c])
        other = self.task([L2(1e-2, schedule="linear(end=1e-3)")])
        line = ("l2.schedule: cosine(end=0.001, steps=20) in the checkpointed run -> "
                "linear(end=0.001) now")  # fmt: skip
        self.assertIn(line, resume.changes(saved, resume.settings(other)))

    def test_sweep_scales_the_curve_without_retracing(self):
        """Each swept value is the start and `end` keeps its ratio (1e-2 -> 1e-3: a tenth);
        0 stays 0; the step is traced once."""
        model_dir = self.create_tempdir().full_path
        penalty = SelectiveL2(1e-2, exclude="bias", schedule="cosine(end=1e-3)")
        task = self.task([penalty], model_dir)
        results, _ = run_sweep(task, parse_sweep("selective_l2.scale=0,0.1"))
        self.assertEqual(task.train_loop.trace_counts()["step"], 1)
        self.assertEqual([r["diverged"] for r in results], [None, None])
        for value in (0.0, 0.1):
            run_dir = os.path.join(model_dir, f"selective_l2.scale={value:g}")
            logged = dict(read_events(run_dir)[0]["strength/selective_l2.scale"])
            self.assertEqual(sorted(logged), list(range(1, 21)))
            expected = [value * multiplier("cosine", s, ratio=0.1) for s in sorted(logged)]
            self.assertAllClose([logged[s] for s in sorted(logged)], expected, rtol=1e-6, atol=0)

    def test_spec_round_trips_and_assignment_sets_the_base(self):
        for spec in ("constant()", "warmup(steps=100)", "cosine(end=1e-05, warmup=100)",
                     "linear(end=0.04, steps=1000, start_step=10)"):  # fmt: skip
            schedule = StrengthSchedule.parse(spec)
            self.assertEqual(StrengthSchedule.parse(schedule.spec()), schedule)
        self.assertEqual(StrengthSchedule.parse("warmup(steps=100)"),
                         StrengthSchedule("constant", warmup=100))  # fmt: skip
        penalty = L2(1e-2, schedule="cosine(end=1e-3)")
        penalty.scale = 0.5
        self.assertEqual(penalty.scale, 0.5)
        self.assertEqual(penalty.params(), {"scale": 0.5, "schedule": "cosine(end=0.001)"})
        self.assertEqual(parse_penalty_spec("max_norm(2.0, schedule='cosine(end=1.0)')").params(),
                         {"max_value": 2.0, "schedule": "cosine(end=1.0)", "axis": 0})  # fmt: skip
        two = TwoStrengths(schedule={"beta": "warmup(steps=3)"})
        self.assertEqual(two.params()["schedule"], {"beta": "warmup(steps=3)"})


class BadScheduleTest(CliTestCase):
    def test_bad_specs_are_one_line_config_errors(self):
        cases = (
            ("l2(1e-3, schedule='cosin(end=0)')", "unknown kind 'cosin'"),
            ("l2(1e-3, schedule='cosine(end=-1)')", "`end` (-1)"),
            ("l2(1e-3, schedule='linear(steps=0)')", "`steps` (0)"),
            ("l2(1e-3, schedule='warmup(steps=-5)')", "`steps` (-5)"),
            ("l2(1e-3, schedule='cosine(end=')", "must be a call"),
            ("l2(1e-3, schedule='cosine(end=x)')", "literal numbers"),
            ("l2(1e-3, schedule='constant(end=1)')", "not end"),
            ("l2(0, schedule='cosine(end=1e-4)')", "starts at 0"),
            ("l2(1e-3, schedule=3)", "`schedule` (3)"),
            ("non_neg(schedule='warmup(steps=3)')", "no strength to schedule"),
            ("max_norm(2.0, schedule='warmup(steps=3)')", "takes it to 0: `max_value` (0.0)"),
            ("max_norm(2.0, schedule='cosine()')", "takes it to 0: `max_value`"),
        )
        for spec, fragment in cases:
            with self.subTest(spec=spec):
                with self.assertRaises(ConfigError) as raised:
                    parse_penalty_spec(spec)
                message = str(raised.exception)
                self.assertNotIn("\n", message)
                self.assertIn(fragment, message)
                self.assertRegex(message, r"penalty '(l2|non_neg|max_norm)'")
        with self.assertRaisesRegex(ConfigError, r"penalty '\w+'.*must be a dict by strength name"):
            TwoStrengths(schedule="warmup(steps=3)")
        with self.assertRaisesRegex(ConfigError, r"names 'gamma'; its strengths: alpha, beta"):
            TwoStrengths(schedule={"gamma": "warmup(steps=3)"})

    def test_bad_spec_on_the_command_line_exits_2(self):
        result = run_cli("--task=synthetic", "--train_steps=1",
                         "--penalty=l2(1e-3, schedule='cosine(end=-1)')")  # fmt: skip
        self.assert_usage_error(result, "penalty 'l2'", "'cosine(end=-1)'")
