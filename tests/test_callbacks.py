"""Callbacks: the interface (order, state, stops, cuts), its checks, and Keras' own callbacks
(CSVLogger, EarlyStopping, TerminateOnNaN, LambdaCallback) called at the documented points."""

import csv
import json
import math
import os
import re

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest

from tasks.synthetic import SyntheticRegression
from trainer import L2, ConfigError
from trainer.run.callbacks import Callback


class SmallSynthetic(SyntheticRegression):
    """The default task's data and a smaller model, named so that a second one built in this
    process reads the first one's checkpoints (Keras numbers unnamed layers per process)."""

    def build_model(self) -> keras.Model:
        return keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(32, activation="relu", name="hidden"),
                keras.layers.Dense(1, name="out"),
            ],
            name="net",
        )


def synthetic(callbacks=(), penalties=(), task=SmallSynthetic, **overrides) -> SyntheticRegression:
    """A task on in-memory data (XLA) with few steps and no TensorBoard scalars."""
    options = {"train_steps": 300, "steps_per_loop": 50, "eval_every": 100, "summary_every": 0}
    return task(
        task.make_options(**{**options, **overrides}), penalties=penalties, callbacks=callbacks
    )


class Recorder(Callback):
    """Records every call as `(name, tag, step)`, with the logs and metrics it was given."""

    def __init__(self, tag="", calls=None):
        self.tag = tag
        self.calls = [] if calls is None else calls
        self.loop_logs, self.metrics = {}, {}

    def on_train_begin(self, result):
        self.calls.append(("train_begin", self.tag, result.step))

    def on_loop_begin(self, step):
        self.calls.append(("loop_begin", self.tag, step))

    def on_loop_end(self, step, logs):
        self.calls.append(("loop_end", self.tag, step))
        self.loop_logs[step] = logs

    def on_evaluate(self, step, metrics):
        self.calls.append(("evaluate", self.tag, step))
        self.metrics[step] = metrics

    def on_train_end(self, result):
        self.calls.append(("train_end", self.tag, result.step))


class CountEvaluations(Callback):
    """Counts evaluations in a variable saved with the run's checkpoints."""

    def __init__(self):
        self.count = tf.Variable(0, dtype=tf.int64)
        self.at_begin = None

    def checkpoint_state(self):
        return {"count": self.count}

    def on_train_begin(self, result):
        self.at_begin = int(self.count.numpy())

    def on_evaluate(self, step, metrics):
        self.count.assign_add(1)


class StopAt(Callback):
    """Asks the run to stop once it reached `step`."""

    def __init__(self, step):
        self.step, self.reached = step, False

    def on_loop_end(self, step, logs):
        self.reached = step >= self.step

    def stop_reason(self):
        return f"step {self.step} reached" if self.reached else None


class CallbackInterfaceTest(absltest.TestCase):
    def test_order_built_ins_then_task_hooks_then_callbacks_as_given(self):
        """At each boundary: the task's hook, then the callbacks in the order given."""
        calls = []

        class Hooked(SmallSynthetic):
            def on_loop_end(self, step, logs):
                calls.append(("loop_end", "hooks", step))

            def on_evaluate(self, step, metrics):
                calls.append(("evaluate", "hooks", step))

            def on_train_end(self, result):
                calls.append(("train_end", "hooks", result.step))

        options = SmallSynthetic.make_options(
            train_steps=200, steps_per_loop=100, eval_every=200, summary_every=0
        )
        task = Hooked(options, callbacks=[Recorder("a", calls), Recorder("b", calls)])
        task.train()
        at = lambda name, step, *tags: [(name, tag, step) for tag in tags]  # noqa: E731
        self.assertEqual(
            calls,
            at("train_begin", 0, "a", "b")
            + at("loop_begin", 0, "a", "b")
            + at("loop_end", 100, "hooks", "a", "b")
            + at("loop_begin", 100, "a", "b")
            + at("loop_end", 200, "hooks", "a", "b")
            + at("evaluate", 200, "hooks", "a", "b")
            + at("train_end", 200, "hooks", "a", "b"),
        )

    def test_logs_are_the_results_figures(self):
        """on_loop_end gets the loop's loss breakdown (the last one is `result.train`),
        on_evaluate the held-out metrics of the history."""
        recorder = Recorder()
        result = synthetic([recorder], penalties=[L2(1e-3)]).train()
        self.assertEqual(sorted(recorder.loop_logs), [50, 100, 150, 200, 250, 300])
        self.assertEqual(recorder.loop_logs[300], result.train)
        self.assertEqual(set(result.train), {"loss", "data_loss", "penalty/l2"})
        self.assertEqual([{"step": s, **m} for s, m in recorder.metrics.items()], result.history)

    def test_state_is_checkpointed_and_restored_before_train_begin(self):
        """Two evaluations before the resume and two after: 4 counted (2 without the state)."""
        d = self.create_tempdir().full_path
        first = CountEvaluations()
        synthetic([first], train_steps=200, model_dir=d).train()
        resumed = CountEvaluations()
        result = synthetic([resumed], train_steps=400, model_dir=d).train()
        self.assertEqual(result.step, 400)
        self.assertEqual((first.at_begin, resumed.at_begin), (0, 2))
        self.assertEqual(int(resumed.count.numpy()), 4)

    def test_two_callbacks_with_state_under_one_key_is_a_config_error(self):
        task = synthetic([CountEvaluations(), CountEvaluations()])
        with self.assertRaisesRegex(ConfigError, "`checkpoint_key` 'CountEvaluations'"):
            task.train()

    def test_stop_between_evaluations_evaluates_saves_and_ends(self):
        """A stop asked at step 150 (evaluations every 100): evaluated and saved at 150."""
        d = self.create_tempdir().full_path
        result = synthetic([StopAt(150)], train_steps=1000, model_dir=d).train()
        self.assertEqual((result.step, result.stopped_early), (150, True))
        self.assertEqual([h["step"] for h in result.history], [100, 150])
        self.assertEqual(tf.train.latest_checkpoint(d), os.path.join(d, "ckpt-150"))
        with open(os.path.join(d, "results.json")) as f:
            self.assertTrue(json.load(f)["stopped_early"])

    def test_loop_cuts_end_loops_there(self):
        class Cut(Recorder):
            loop_cuts = (130,)

        recorder = Cut()
        synthetic([recorder], train_steps=200).train()
        self.assertEqual(sorted(recorder.loop_logs), [50, 100, 130, 180, 200])

    def test_a_bad_callback_is_one_line_naming_it(self):
        for bad in (3, "csv", keras.optimizers.SGD):
            with self.assertRaisesRegex(
                ConfigError, "^`callbacks` must hold .*" + re.escape(repr(bad))
            ):
                synthetic([bad])


class KerasCallbacksTest(absltest.TestCase):
    def test_csv_logger_writes_one_row_per_evaluation_with_train_and_val_columns(self):
        d = self.create_tempdir().full_path
        path = os.path.join(d, "log.csv")
        recorder = Recorder()
        callbacks = [recorder, keras.callbacks.CSVLogger(path)]
        synthetic(callbacks, penalties=[L2(1e-3)], model_dir=d).train()
        with open(path) as f:
            rows = list(csv.DictReader(f))
        with open(os.path.join(d, "results.json")) as f:
            results = json.load(f)
        self.assertEqual(list(rows[0]), ["epoch", "data_loss", "loss", "penalty/l2", "val_loss"])
        self.assertEqual([int(r["epoch"]) for r in rows], [0, 1, 2])
        for row, evaluation in zip(rows, results["history"], strict=True):
            self.assertEqual(float(row["val_loss"]), evaluation["loss"])
            train = recorder.loop_logs[evaluation["step"]]  # the epoch's last loop
            for name in ("loss", "data_loss", "penalty/l2"):
                self.assertEqual(float(row[name]), train[name])
        self.assertEqual(float(rows[-1]["loss"]), results["train"]["loss"])

    def test_early_stopping_stops_where_early_stop_patience_does(self):
        """On the default task (it overfits): Keras' EarlyStopping(val_loss, patience=2) and
        the built-in early_stop_patience=2 stop at the same step, with the same evaluations;
        the Keras stop is saved at that step."""
        every = {"train_steps": 5000, "eval_every": 50, "task": SyntheticRegression}
        built_in = synthetic(early_stop_patience=2, **every).train()
        d = self.create_tempdir().full_path
        stopping = keras.callbacks.EarlyStopping(monitor="val_loss", patience=2)
        keras_run = synthetic([stopping], model_dir=d, **every).train()
        self.assertTrue(built_in.stopped_early)
        self.assertLess(built_in.step, 5000)
        self.assertEqual((keras_run.step, keras_run.stopped_early), (built_in.step, True))
        self.assertEqual(keras_run.history, built_in.history)
        self.assertEqual(stopping.stopped_epoch, built_in.step // 50 - 1)
        self.assertEqual(tf.train.latest_checkpoint(d), os.path.join(d, f"ckpt-{built_in.step}"))

    def test_restore_best_weights_is_refused_naming_keep_best(self):
        stopping = keras.callbacks.EarlyStopping(restore_best_weights=True)
        with self.assertRaisesRegex(ConfigError, "restore_best_weights=True.*keep_best=True"):
            synthetic([stopping])

    def test_learning_rate_callbacks_are_refused_naming_lr_schedule(self):
        for callback in (
            keras.callbacks.LearningRateScheduler(lambda epoch, rate: rate),
            keras.callbacks.ReduceLROnPlateau(),
        ):
            name = type(callback).__name__
            with self.assertRaisesRegex(ConfigError, f"^`callbacks` holds .*{name}.*lr_schedule"):
                synthetic([callback])

    def test_terminate_on_nan_sees_the_loop_and_the_run_ends_with_its_error(self):
        """SGD at 1e4 diverges: the run ends with the FloatingPointError naming the step;
        TerminateOnNaN saw that loop's loss (and asked to stop); nothing from it was saved."""
        d = self.create_tempdir().full_path
        batch_ends = []
        seen = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: batch_ends.append((batch, logs["loss"]))
        )
        terminate = keras.callbacks.TerminateOnNaN()
        diverging = {"optimizer": "sgd", "learning_rate": 1e4, "steps_per_loop": 10}
        task = synthetic(
            [terminate, seen], eval_every=0, checkpoint_every=10, model_dir=d, **diverging
        )
        with self.assertRaisesRegex(FloatingPointError, r"^Non-finite loss at step \d+") as e:
            task.train()
        step = int(re.match(r"Non-finite loss at step (\d+)", str(e.exception)).group(1))
        self.assertEqual(batch_ends[-1][0], step - 1)
        self.assertFalse(math.isfinite(batch_ends[-1][1]))
        self.assertTrue(all(math.isfinite(loss) for _, loss in batch_ends[:-1]))
        self.assertTrue(task.model.stop_training)
        saved = tf.train.get_checkpoint_state(d)
        steps = (
            [int(p.rsplit("-", 1)[1]) for p in saved.all_model_checkpoint_paths] if saved else []
        )
        self.assertTrue(all(s < step for s in steps), steps)
        if os.path.exists(os.path.join(d, "results.json")):  # written with each checkpoint
            with open(os.path.join(d, "results.json")) as f:
                self.assertLess(json.load(f)["step"], step)

    def test_terminate_on_nan_with_rollback_sees_only_the_last_blow_up(self):
        """Rollbacks undo the loops before TerminateOnNaN is asked: it sees the blow-up after
        the last rollback, with which the run ends."""
        batch_ends = []
        seen = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: batch_ends.append(logs["loss"])
        )
        diverging = {"optimizer": "sgd", "learning_rate": 1e4, "steps_per_loop": 10}
        task = synthetic(
            [keras.callbacks.TerminateOnNaN(), seen],
            eval_every=0,
            on_nonfinite="rollback",
            max_rollbacks=2,
            **diverging,
        )
        with self.assertRaisesRegex(FloatingPointError, "^Non-finite loss at step"):
            task.train()
        self.assertEqual(sum(not math.isfinite(loss) for loss in batch_ends), 1)
        self.assertAlmostEqual(float(task.optimizer.learning_rate.numpy()), 2500.0, places=3)

    def test_lambda_callback_is_called_at_the_documented_points(self):
        """300 steps, loops of 50, evaluations every 100: three epochs of two batches each;
        batch indices within the epoch; epoch logs = the last loop's figures + val_ metrics."""
        calls = []

        def record(name):
            return lambda *args: calls.append((name, *args))

        names = ("train_begin", "train_end", "epoch_begin", "epoch_end")
        lam = keras.callbacks.LambdaCallback(
            **{f"on_{name}": record(name) for name in names},
            on_train_batch_begin=record("batch_begin"),
            on_train_batch_end=record("batch_end"),
        )
        recorder = Recorder()
        task = synthetic([recorder, lam])
        result = task.train()
        self.assertIs(lam.model, task.model)
        self.assertEqual(lam.params, {"epochs": 3, "steps": 100, "verbose": 1})
        names = [c[0] for c in calls]
        epoch = ["epoch_begin", "batch_begin", "batch_end", "batch_begin", "batch_end", "epoch_end"]
        self.assertEqual(names, ["train_begin", *epoch * 3, "train_end"])
        self.assertEqual([c[1] for c in calls if c[0] == "epoch_begin"], [0, 1, 2])
        self.assertEqual([c[1] for c in calls if c[0] == "batch_begin"], [0, 50] * 3)
        ends = [c[1:] for c in calls if c[0] == "batch_end"]
        self.assertEqual([b for b, _ in ends], [49, 99] * 3)
        self.assertEqual(
            [logs for _, logs in ends], [recorder.loop_logs[s] for s in range(50, 301, 50)]
        )
        epoch_ends = [c[1:] for c in calls if c[0] == "epoch_end"]
        for (epoch_index, logs), evaluation in zip(epoch_ends, result.history, strict=True):
            step = evaluation["step"]
            self.assertEqual(step, 100 * (epoch_index + 1))
            self.assertEqual(logs, {**recorder.loop_logs[step], "val_loss": evaluation["loss"]})
        self.assertEqual(calls[-1], ("train_end", epoch_ends[-1][1]))

    def test_epochs_go_on_counting_after_a_resume(self):
        d = self.create_tempdir().full_path
        synthetic(train_steps=200, model_dir=d).train()
        epochs = []
        lam = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: epochs.append(e))
        synthetic([lam], train_steps=400, model_dir=d).train()
        self.assertEqual(epochs, [2, 3])

    def test_epoch_end_sees_the_evaluated_ema_weights(self):
        """With ema_decay, ModelCheckpoint-like callbacks get the weights val_ measured."""
        seen, raw = [], []
        lam = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda e, logs: seen.append([w.copy() for w in lam.model.get_weights()]),
            on_train_batch_end=lambda b, logs: raw.append(lam.model.get_weights()),
        )
        task = synthetic([lam], train_steps=100, ema_decay=0.9)
        task.train()
        with task.evaluated_weights():
            ema = task.model.get_weights()
        for a, b in zip(seen[-1], ema, strict=True):
            np.testing.assert_array_equal(a, b)
        self.assertFalse(all(np.array_equal(a, b) for a, b in zip(seen[-1], raw[-1])))


if __name__ == "__main__":
    absltest.main()
