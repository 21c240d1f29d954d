"""The train/eval gap (`train_eval_examples`): the training slice's evaluation, the training
metrics streamed in the loop, the gap in results.json, TrainResult and TensorBoard."""

import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf
from array_task import ArrayTask, regression_data
from test_tensorboard import read_events

from tasks.synthetic import SyntheticRegression
from trainer import L2, TrainerOptions
from trainer.distribution import make_strategy
from trainer.run import records
from trainer.run.controller import RESULTS_SCHEMA

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
from harness import while_body_ops

SLICE = 24  # training examples evaluated: not a multiple of the batch (16)


class MetricTask(ArrayTask):
    """`ArrayTask` with a metric, and a held-out set apart from the training data."""

    def build_metrics(self):
        return {"mae": keras.metrics.MeanAbsoluteError()}

    def eval_dataset(self):
        x, y = regression_data(n=32, seed=1)
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)


class InMemoryTask(MetricTask):
    """`MetricTask` whose data are `train_arrays` (the in-memory loop, shuffled)."""

    def train_arrays(self):
        return self.x, self.y


def make_task(strategy=None, cls=MetricTask, **options):
    x, y = regression_data(n=64)
    defaults = {"batch_size": 16, "train_steps": 20, "steps_per_loop": 10, "learning_rate": 0.05,
                "train_eval_examples": SLICE}  # fmt: skip
    return cls(x, y, TrainerOptions(**{**defaults, **options}), strategy=strategy)


def relative_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-12))


class TrainSliceTest(tf.test.TestCase):
    def test_is_evaluate_on_those_examples(self):
        """`evaluate_train_slice()` ≡ `evaluate()` on a dataset of the first 24 training
        examples in the same batches: bit for bit; twice the same (a fixed slice); from
        `train_dataset` and from `train_arrays` (not in their shuffled order)."""
        for cls in (MetricTask, InMemoryTask):
            task = make_task(cls=cls, jit_compile=False)
            task.train_loop.run(
                3, None if task.train_loop.in_memory else iter(task.train_dataset())
            )
            x, y = task.x[:SLICE], task.y[:SLICE]
            same = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
            self.assertEqual(task.evaluate_train_slice(), task.evaluate(same))
            self.assertEqual(task.evaluate_train_slice(), task.evaluate(same))
            self.assertEqual(set(task.evaluate_train_slice()), {"loss", "mae"})

    def test_with_ema_uses_the_ema_weights(self):
        """With `ema_decay`, the slice's loss and MAE are NumPy's on the outputs of the EMA
        weights (rtol 1e-6), not on those of the trained ones (≥ 1e-3 apart)."""
        task = make_task(ema_decay=0.9)
        task.train_loop.run(10, iter(task.train_dataset()))
        x, y = task.x[:SLICE].astype(np.float64), task.y[:SLICE].astype(np.float64)
        trained = task.model(task.x[:SLICE]).numpy().astype(np.float64)
        with task.evaluated_weights():
            ema = task.model(task.x[:SLICE]).numpy().astype(np.float64)
        got = task.evaluate_train_slice()
        self.assertAllClose(got["loss"], np.mean((y - ema) ** 2), rtol=1e-6)
        self.assertAllClose(got["mae"], np.mean(np.abs(y - ema)), rtol=1e-6)
        self.assertGreater(relative_diff(got["loss"], np.mean((y - trained) ** 2)), 1e-3)
        del x


class StreamingMetricsTest(tf.test.TestCase):
    def test_metric_over_a_loop_with_sam_and_accumulation(self):
        """`train/mae` of one 4-step loop ≡ NumPy's MAE over the 4 batches trained on, each
        with the weights before its step (recorded by a twin trained one step per loop): SAM's
        second pass at w+ε and the 2 micro-batches do not change it (rtol 1e-6)."""
        options = {"sam_rho": 0.5, "accumulate_steps": 2, "train_steps": 4}
        twin = make_task(**options)
        iterator = iter(twin.train_dataset())
        weights, per_step = [], []
        for _ in range(4):
            weights.append(twin.model.get_weights())
            per_step.append(twin.train_loop.run(1, iterator)[0]["train/mae"])
        task = make_task(**options)
        logs, step = task.train_loop.run(4, iter(task.train_dataset()))
        self.assertEqual(step, 4)
        errors = []
        for i, w in enumerate(weights):
            twin.model.set_weights(w)
            x, y = task.x[16 * i : 16 * (i + 1)], task.y[16 * i : 16 * (i + 1)]
            errors.append(np.abs(y.astype(np.float64) - twin.model(x).numpy()))
            self.assertAllClose(per_step[i], np.mean(errors[-1]), rtol=1e-6)
        self.assertAllClose(logs["train/mae"], np.mean(errors), rtol=1e-6)

    def test_two_replicas_match_one_device(self):
        """MirroredStrategy on 2 logical CPUs ≡ one device: `train/mae` of a 4-step loop,
        rtol 1e-6 (the metric's sums add up across the replicas)."""
        one = make_task()
        one_logs, _ = one.train_loop.run(4, iter(one.train_dataset()))
        two = make_task(strategy=make_strategy("mirrored", cpu_replicas=2))
        iterator = iter(two.distribute(two.train_dataset()))
        two_logs, _ = two.train_loop.run(4, iterator)
        self.assertAllClose(two_logs["train/mae"], one_logs["train/mae"], rtol=1e-6)
        self.assertAllClose(two_logs["loss"], one_logs["loss"], rtol=1e-6)

    def test_off_adds_no_op_to_the_loop_body(self):
        """Off (the default), a task with metrics has the loop body of one without; on, more."""

        class NoMetrics(ArrayTask):
            pass

        def body_ops(cls, n):
            x, y = regression_data(n=64)
            task = cls(x, y, TrainerOptions(batch_size=16, train_eval_examples=n))
            return while_body_ops(task.train_loop.concrete_function(iter(task.train_dataset())))

        off = body_ops(MetricTask, 0)
        self.assertEqual(off, body_ops(NoMetrics, 0))
        self.assertGreater(body_ops(MetricTask, SLICE), off)


class GapReportedTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model_dir = os.path.join(tf.compat.v1.test.get_temp_dir(), "gap_run")
        cls.task = make_task(model_dir=cls.model_dir, eval_every=10, summary_every=10)
        cls.result = cls.task.train()

    def test_result_holds_train_eval_and_gap(self):
        """`gap[k]` is `train_eval[k] - eval[k]` exactly; `train_eval` is the slice's
        evaluation with the final weights; both in `to_dict()`."""
        result = self.result
        self.assertEqual(set(result.gap), {"loss", "mae"})
        for k, v in result.gap.items():
            self.assertEqual(v, result.train_eval[k] - result.eval[k])
        self.assertEqual(result.train_eval, self.task.evaluate_train_slice())
        self.assertNotEqual(result.gap["loss"], 0.0)
        self.assertEqual(result.to_dict()["gap"], result.gap)
        self.assertIn("train/mae", result.train)

    def test_results_json_history(self):
        """results.json reads back with its schema; each evaluation has `train_eval/<k>` and
        `gap/<k>` = train − eval exactly."""
        path = os.path.join(self.model_dir, "results.json")
        saved = records.read(path, RESULTS_SCHEMA)
        self.assertEqual([h["step"] for h in saved["history"]], [10, 20])
        for entry in saved["history"]:
            for k in ("loss", "mae"):
                self.assertEqual(entry[f"gap/{k}"], entry[f"train_eval/{k}"] - entry[k])
        self.assertEqual(saved["gap"], self.result.gap)
        with open(path) as f:
            old = {k: v for k, v in json.load(f).items() if k not in ("gap", "train_eval")}
        old_path = os.path.join(self.model_dir, "old.json")
        with open(old_path, "w") as f:
            json.dump(old, f)
        self.assertNotIn("gap", records.read(old_path, RESULTS_SCHEMA))

    def test_tensorboard(self):
        """`train_eval/<k>`, `gap/<k>`, `eval/<k>` at each evaluation, as results.json has them
        (float32: rtol 1e-6); `train/mae` (streamed) after each loop."""
        scalars, _, _ = read_events(self.model_dir)
        history = {h["step"]: h for h in self.result.history}
        for k in ("loss", "mae"):
            for prefix in ("train_eval/", "gap/", "eval/"):
                tag = prefix + k
                self.assertEqual([s for s, _ in scalars[tag]], [10, 20], tag)
                key = k if prefix == "eval/" else tag
                for step, value in scalars[tag]:
                    self.assertAllClose(value, history[step][key], rtol=1e-6)
        self.assertEqual([s for s, _ in scalars["train/mae"]], [10, 20])
        self.assertAllClose(scalars["train/mae"][-1][1], self.result.train["train/mae"], rtol=1e-6)


class GapShrinksWithL2Test(tf.test.TestCase):
    def test_default_task_three_strengths(self):
        """The default task, 300 steps from the same start at λ = 0, 1e-3, 1e-2 (one trainer,
        its strength variable set, no retrace): the held-out loss and the gap's magnitude
        both decrease as λ grows (measured 0.84, 0.75, 0.56: far apart)."""
        options = SyntheticRegression.make_options(
            train_steps=300, steps_per_loop=300, train_eval_examples=128, jit_compile=False
        )
        penalty = L2(0.0)
        task = SyntheticRegression(options, penalties=[penalty])
        initial = task.get_state()
        evals, gaps = [], []
        for scale in (0.0, 1e-3, 1e-2):
            task.set_state(initial)
            penalty.strength("scale").assign(scale)
            task.train_loop.run(300)
            held_out, train = task.evaluate(), task.evaluate_train_slice()
            evals.append(held_out["loss"])
            gaps.append(abs(train["loss"] - held_out["loss"]))
        self.assertEqual(task.train_loop.trace_counts()["loop"], 1)
        self.assertEqual(gaps, sorted(gaps, reverse=True), gaps)
        self.assertEqual(evals, sorted(evals, reverse=True), evals)
        self.assertGreater(gaps[0] - gaps[2], 0.1, gaps)
