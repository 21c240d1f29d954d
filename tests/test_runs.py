"""Runs that manage themselves: early stopping, the best evaluation kept and exported, rollback
after a non-finite loss, hooks and profiling; through the CLI and in process."""

import functools
import glob
import json
import os
from typing import ClassVar
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest
from array_task import ArrayTask, regression_data
from test_resume import ResumeTestCase, final_weights

from tasks.synthetic import make_data
from trainer import Controller, TrainerOptions
from trainer.distribution import make_strategy
from trainer.run.protocol import Runnable


class ScriptedEval(ArrayTask):
    """Evaluations return `losses[step]`, so that improvement is decided by the test."""

    losses: ClassVar[dict[int, float]] = {}

    def evaluate(self, dataset=None):
        del dataset
        return {"loss": self.losses[self.step]}


class PoisonedLoss(ArrayTask):
    """The loss is infinite from step `poison_from` on while the learning rate is above
    `poison_above`: a blow-up that a rollback with a lower rate gets past."""

    poison_from, poison_above = 250, 0.06

    def compute_loss(self, labels, outputs):
        loss = super().compute_loss(labels, outputs)
        bad = (self.optimizer.iterations >= self.poison_from) & (
            self.optimizer.learning_rate > self.poison_above
        )
        return tf.where(bad, tf.fill(tf.shape(loss), np.inf), loss)

    def on_loop_end(self, step, logs):
        self.loop_ends.append(step)


def sgd_options(**kw) -> TrainerOptions:
    base = {"optimizer": "sgd", "learning_rate": 0.1, "batch_size": 16, "steps_per_loop": 100,
            "summary_every": 0}  # fmt: skip
    return TrainerOptions(**{**base, **kw})


class EarlyStoppingTest(ResumeTestCase):
    def scripted(self, losses, **kw) -> ScriptedEval:
        x, y = regression_data()
        task = ScriptedEval(x, y, sgd_options(**kw))
        task.losses = losses
        return task

    def test_early_stopping_cli_stops_keeps_best_and_exports_it(self):
        """The issue's acceptance run on the default task: it stops early; best.step is the
        lowest eval loss of the history; best/ holds a checkpoint; the export's held-out MSE is
        that best loss."""
        d, e = self.model_dir(), os.path.join(self.model_dir(), "export")
        self.cli("--train_steps=20000", "--eval_every=100", "--early_stop_patience=3",
                 "--keep_best", f"--model_dir={d}", f"--export_dir={e}")  # fmt: skip
        with open(os.path.join(d, "results.json")) as f:
            results = json.load(f)
        self.assertTrue(results["stopped_early"])
        self.assertLess(results["step"], 20000)
        history = results["history"]
        lowest = min(history, key=lambda h: h["loss"])
        self.assertEqual(results["best"], lowest)
        self.assertEqual(results["step"], history[-1]["step"])
        self.assertEqual(len([h for h in history if h["step"] > lowest["step"]]), 3)
        self.assertIsNotNone(tf.train.latest_checkpoint(os.path.join(d, "best")))
        _, _, x_eval, y_eval = make_data()
        exported = tf.saved_model.load(e)
        predictions = exported.serve(x_eval).numpy()
        mse = float(np.mean((predictions.astype(np.float64) - y_eval) ** 2))
        self.assertAlmostEqual(mse, lowest["loss"], delta=1e-5 * lowest["loss"])

    def test_early_stopping_counts_evaluations_with_min_delta(self):
        """0.45 beats 0.5 (the new best) but not by min_delta 0.1: with patience 2 the run
        stops at the next evaluation that does not improve, step 400."""
        losses = {100: 1.0, 200: 0.5, 300: 0.45, 400: 0.6}
        options = {"eval_every": 100, "early_stop_patience": 2, "early_stop_min_delta": 0.1}
        task = self.scripted(losses, train_steps=1000, **options)
        result = task.train()
        self.assertTrue(result.stopped_early)
        self.assertEqual(result.step, 400)
        self.assertEqual(result.best, {"step": 300, "loss": 0.45})
        self.assertEqual([h["step"] for h in result.history], [100, 200, 300, 400])

    def test_early_stopping_state_is_checkpointed_and_resumed(self):
        """Two evaluations without improvement before the resume and one after stop the run at
        400 (a fresh count would go on to 700); a rerun then stays stopped."""
        d = self.model_dir()
        losses = {s: 1.0 + s / 1000 for s in range(100, 1100, 100)}
        common = {"eval_every": 100, "early_stop_patience": 3, "model_dir": d}
        first = self.scripted(losses, train_steps=300, **common).train()
        self.assertFalse(first.stopped_early)
        resumed = self.scripted(losses, train_steps=1000, **common).train()
        self.assertTrue(resumed.stopped_early)
        self.assertEqual(resumed.step, 400)
        self.assertEqual(resumed.best, {"step": 100, "loss": 1.1})
        again = self.scripted(losses, train_steps=1000, **common).train()
        self.assertEqual((again.step, again.stopped_early), (400, True))

    def test_early_stopping_under_mirrored_strategy_stops_every_replica_together(self):
        """Two replicas on logical CPUs: the decision from the reduced evaluation stops the one
        run at the second evaluation (min_delta so large that nothing improves)."""
        x, y = regression_data()
        options = sgd_options(train_steps=1000, eval_every=100, early_stop_patience=1,
                              early_stop_min_delta=1e9)  # fmt: skip
        task = ArrayTask(x, y, options, strategy=make_strategy("mirrored", cpu_replicas=2))
        result = task.train()
        self.assertTrue(result.stopped_early)
        self.assertEqual((result.step, task.step, result.best["step"]), (200, 200, 100))


class BestTest(ResumeTestCase):
    def test_keep_best_saves_the_evaluated_ema_weights_never_rotated(self):
        """With ema_decay, best/ holds the EMA weights of the best evaluation (step 200) after
        800 more steps of checkpoints every 100 (3 kept)."""
        d = self.model_dir()
        x, y = regression_data()
        seen = {}

        class Recording(ScriptedEval):
            def evaluate(self, dataset=None):
                with self.evaluated_weights():
                    seen[self.step] = [v.numpy() for v in self.model.variables]
                seen.setdefault("raw", {})[self.step] = [v.numpy() for v in self.model.variables]
                return super().evaluate(dataset)

        options = sgd_options(train_steps=1000, eval_every=100, keep_best=True, model_dir=d,
                              ema_decay=0.9, checkpoint_every=100)  # fmt: skip
        task = Recording(x, y, options)
        task.losses = {s: abs(s - 200) / 100 + 1 for s in range(100, 1100, 100)}
        result = task.train()
        self.assertEqual(result.best, {"step": 200, "loss": 1.0})
        self.assertEqual(tf.train.latest_checkpoint(os.path.join(d, "best")),
                         os.path.join(d, "best", "ckpt-200"))  # fmt: skip
        self.assertNotIn(os.path.join(d, "ckpt-200"), tf.train.get_checkpoint_state(d)
                         .all_model_checkpoint_paths)  # fmt: skip
        best = final_weights(os.path.join(d, "best"))
        for saved, ema in zip(best, seen[200], strict=True):
            np.testing.assert_array_equal(saved, ema)
        self.assertFalse(all(np.array_equal(a, b) for a, b in zip(seen[200], seen["raw"][200])))

    def test_keep_best_without_eval_every_is_a_config_error(self):
        result = self.cli("--keep_best", "--model_dir=" + self.model_dir(), status=2)
        self.assertIn("`keep_best` (True) needs `eval_every`", result.stderr)


class RollbackTest(ResumeTestCase):
    def poisoned(self, **kw) -> PoisonedLoss:
        x, y = regression_data()
        task = PoisonedLoss(x, y, sgd_options(on_nonfinite="rollback", **kw))
        task.loop_ends = []
        return task

    def test_rollback_to_last_checkpoint_halves_learning_rate(self):
        task = self.poisoned(train_steps=400, checkpoint_every=100, model_dir=self.model_dir())
        result = task.train()
        self.assertEqual((result.step, result.rollbacks), (400, 1))
        self.assertEqual(task.loop_ends, [100, 200, 300, 400])  # 300 once: the bad loop is undone
        self.assertAlmostEqual(float(task.optimizer.learning_rate.numpy()), 0.05, places=7)

    def test_rollback_without_checkpoint_returns_to_the_initial_state(self):
        x, y = regression_data()
        fresh = ArrayTask(x, y, sgd_options(train_steps=100))
        fresh.model  # noqa: B018
        initial = fresh.get_state()
        task = self.poisoned(train_steps=200, rollback_lr_factor=0.25)
        task.poison_from = 50
        task.model  # noqa: B018
        for a, b in zip(task.get_state(), initial, strict=True):
            np.testing.assert_array_equal(a, b)
        result = task.train()
        self.assertEqual((result.step, result.rollbacks), (200, 1))
        self.assertEqual(task.loop_ends, [100, 200])
        self.assertAlmostEqual(float(task.optimizer.learning_rate.numpy()), 0.025, places=7)

    def test_rollback_cli_reports_each_and_exits_without_traceback(self):
        """The issue's run: SGD at 3.0 diverges at once; each rollback is one line; after the
        last one it stops as without rollback (exit 1, step and term named)."""
        result = run_with_status(self, "--optimizer=sgd", "--learning_rate=3.0",
                                 "--on_nonfinite=rollback", "--checkpoint_every=100",
                                 f"--model_dir={self.model_dir()}")  # fmt: skip
        lines = [line for line in result.stderr.splitlines() if "Rollback " in line]
        self.assertEqual(len(lines), 3, result.stderr[-3000:])
        self.assertIn("learning rate 3 -> 1.5", lines[0])
        if result.returncode == 1:
            self.assertRegex(result.stderr.splitlines()[-1], r"Non-finite loss at step \d+: \w+")


def run_with_status(case, *args):
    from test_cli import run_cli

    result = run_cli(*args)
    case.assertIn(result.returncode, (0, 1), result.stderr[-3000:])
    case.assertNotIn("Traceback", result.stderr)
    return result


class HooksAndProfileTest(ResumeTestCase):
    def hooked(self, *args: str) -> list[dict]:
        log = os.path.join(self.model_dir(), "hooks.jsonl")
        with mock.patch.dict(os.environ, {"RUNS_HOOK_LOG": log}):
            self.cli("--import=runs_plugin", "--task=hooked_synthetic", *args)
        with open(log) as f:
            return [json.loads(line) for line in f]

    def test_hooks_from_an_imported_task_called_for_every_loop_and_evaluation(self):
        d = self.model_dir()
        calls = self.hooked("--train_steps=300", "--steps_per_loop=50", "--eval_every=100",
                            f"--model_dir={d}")  # fmt: skip
        self.assertEqual(
            [c["step"] for c in calls if c["hook"] == "loop"], list(range(50, 301, 50))
        )
        with open(os.path.join(d, "results.json")) as f:
            history = json.load(f)["history"]
        evaluations = [c for c in calls if c["hook"] == "evaluate"]
        self.assertEqual([(c["step"], c["loss"]) for c in evaluations],
                         [(h["step"], h["loss"]) for h in history])  # fmt: skip
        self.assertEqual([c["step"] for c in evaluations], [100, 200, 300])
        self.assertEqual(calls[-1], {"hook": "train_end", "step": 300})

    def test_profiling_cuts_loops_and_a_resume_traces_what_is_left_of_the_range(self):
        """Steps 20-60 of a run are traced, loops cut there; a resume at step 100 with the same
        range writes no trace and says why; one at step 200 with 150-210 traces 200-210 (a loop
        cut at 210) and says so. A resume also logs a changed early_stop_patience."""
        d = self.model_dir()
        traces = os.path.join(d, "plugins", "profile", "*", "*.xplane.pb")
        log = os.path.join(d, "hooks.jsonl")
        with mock.patch.dict(os.environ, {"RUNS_HOOK_LOG": log}):
            run = functools.partial(self.cli, "--import=runs_plugin", "--task=hooked_synthetic",
                                    f"--model_dir={d}")  # fmt: skip
            run("--train_steps=100", "--profile_steps=20,60")
            self.assertLen(glob.glob(traces), 1)
            passed = run("--train_steps=200", "--profile_steps=20,60", "--eval_every=100",
                         "--early_stop_patience=5")  # fmt: skip
            self.assertLen(glob.glob(traces), 1)
            inside = run("--train_steps=300", "--profile_steps=150,210")
        self.assertIn("profile_steps 20,60: no trace is written, the run starts from step 100, "
                      "past the range", passed.stderr)  # fmt: skip
        self.assertIn("Resuming with a change: early_stop_patience: 0 in the checkpointed run "
                      "-> 5 now", passed.stderr)  # fmt: skip
        self.assertIn("profile_steps 150,210: the run starts from step 200, inside the range; "
                      "tracing steps 200 to 210 only", inside.stderr)  # fmt: skip
        self.assertIn("Profiled steps 200 to 210", inside.stderr)
        self.assertLen(glob.glob(traces), 2)
        with open(log) as f:
            loops = [c["step"] for c in map(json.loads, f) if c["hook"] == "loop"]
        self.assertEqual(loops, [20, 60, 100, 200, 210, 300])

    def test_profile_steps_invalid_is_one_line_naming_the_value(self):
        result = self.cli("--profile_steps=210,200", f"--model_dir={self.model_dir()}", status=2)
        errors = [line for line in result.stderr.splitlines() if line.startswith("trainer:")]
        self.assertEqual(len(errors), 1, result.stderr)
        self.assertIn("`profile_steps` ('210,200')", errors[0])


class OnlyRunnable:
    """A trainer seen through `protocol.Runnable`: reading any other attribute fails."""

    MEMBERS = frozenset(n for n in vars(Runnable) if not n.startswith("_"))

    def __init__(self, trainer):
        self.trainer = trainer

    def __getattr__(self, name):
        if name not in self.MEMBERS:
            raise AttributeError(f"{name!r} is not a member of Runnable")
        return getattr(self.trainer, name)


class RunnableTest(ResumeTestCase):
    def test_the_controller_reads_only_runnable_members(self):
        """Evaluations, keep_best with EMA, checkpoints, a rollback, the export, a Keras
        callback and a resume, on a proxy with only `Runnable`'s members; the proxy is no
        `Hooks`, so the task's hooks are not called."""
        d = self.model_dir()
        x, y = regression_data()

        def run(train_steps):
            runs = {"eval_every": 100, "keep_best": True, "checkpoint_every": 100, "model_dir": d}
            options = sgd_options(
                train_steps=train_steps,
                ema_decay=0.9,
                on_nonfinite="rollback",
                export_dir=os.path.join(d, "export"),
                **runs,
            )
            task = PoisonedLoss(x, y, options)
            task.loop_ends, epochs = [], []
            task.callbacks = [
                keras.callbacks.LambdaCallback(on_epoch_end=lambda e, _: epochs.append(e))
            ]
            return task, Controller(OnlyRunnable(task)).train(), epochs

        self.assertIn("evaluated_weights", OnlyRunnable.MEMBERS)
        task, result, epochs = run(400)
        self.assertEqual((result.step, result.rollbacks, epochs), (400, 1, [0, 1, 2, 3]))
        self.assertEqual(task.loop_ends, [])
        self.assertTrue(os.path.isdir(os.path.join(d, "export")))
        _, resumed, epochs = run(600)
        self.assertEqual((resumed.step, epochs), (600, [4, 5]))
        self.assertEqual([h["step"] for h in resumed.history], list(range(100, 601, 100)))


if __name__ == "__main__":
    absltest.main()
