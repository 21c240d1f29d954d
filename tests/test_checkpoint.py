"""Checkpoints: exact resume after SIGKILL, SIGTERM preemption, NaNs, foreign and damaged dirs."""

import json
import os
import random

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from array_task import ArrayTask, regression_data, small_model
from cli_runner import run_cli, run_cli_process

from trainer import ConfigError, Penalty, Preempted, TrainerOptions
from trainer.run.checkpointing import Checkpointer
from trainer.run.controller import make_checkpointer
from trainer.run.files import write_json

TIMEOUT_S = 180


TASK = ("--import=ckpt_plugin", "--task=resume_regression", "--deterministic")


def run_process(model_dir, *flags, **env):
    """`python -m trainer --task=resume_regression --deterministic ...` as a process (the
    process is what is killed and preempted); returns it, finished."""
    return run_cli_process(*TASK, f"--model_dir={model_dir}", *flags, timeout=TIMEOUT_S, **env)


def run_here(model_dir, *flags):
    """The same command in this process, as in a fresh one (the unbroken run and the reruns:
    no process of theirs is under test); returns its `CliResult`."""
    return run_cli(*TASK, f"--model_dir={model_dir}", *flags)


def checkpoint_weights(model_dir):
    """The model variables of the latest checkpoint in `model_dir`, in model order."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir))
    names = sorted(
        (n for n in reader.get_variable_to_shape_map() if n.startswith("model_variables/")),
        key=lambda n: int(n.split("/")[1]),
    )
    return [reader.get_tensor(n) for n in names]


class ResumeTest(tf.test.TestCase):
    """Kill the CLI at a step, rerun the same command: the weights are those of an unbroken run.

    The killed and preempted runs are processes; the unbroken run and the reruns run the same
    command in this process (`run_cli`, as in a fresh one: the same ops, so the same bits).
    """

    _reference: list[np.ndarray] | None = None  # an unbroken run's weights, once per class

    def setUp(self):
        super().setUp()
        self.root = self.create_tempdir().full_path

    def reference(self) -> list[np.ndarray]:
        if ResumeTest._reference is None:
            reference_dir = os.path.join(self.create_tempdir().full_path, "unbroken")
            done = run_here(reference_dir)
            self.assertEqual(done.returncode, 0, done.stderr[-2000:])
            ResumeTest._reference = checkpoint_weights(reference_dir)
        return ResumeTest._reference

    def assert_bit_identical(self, model_dir):
        got, reference = checkpoint_weights(model_dir), self.reference()
        self.assertLen(got, len(reference))
        self.assertGreaterEqual(len(got), 7)  # 3 Dense layers x 2 + the dropout seed state
        for a, b in zip(got, reference):
            np.testing.assert_array_equal(a, b)

    def test_sigkill_at_a_random_step_then_resume_is_bit_identical(self):
        """Deterministic mode: SIGKILL at step 10k (k random), rerun, compare bit for bit."""
        kill_at = 10 * random.Random().randint(1, 5)  # checkpoints are every 25 steps
        model_dir = os.path.join(self.root, "killed")
        killed = run_process(model_dir, KILL_AT_STEP=str(kill_at))
        self.assertEqual(killed.returncode, -9, msg=f"kill at {kill_at}: {killed.stderr[-2000:]}")
        if os.path.exists(os.path.join(model_dir, "results.json")):  # from the evaluations before
            with open(os.path.join(model_dir, "results.json")) as f:
                self.assertLess(json.load(f)["step"], kill_at)
        resumed = run_here(model_dir)
        self.assertEqual(resumed.returncode, 0, resumed.stderr[-2000:])
        if kill_at > 25:  # the kill fires in evaluate, which runs before the same step's save
            self.assertIn(f"ckpt-{(kill_at - 1) // 25 * 25}", resumed.stderr)
        self.assert_bit_identical(model_dir)
        # Rerunning a finished run (here, in this process) does not train again.
        again = run_here(model_dir)
        self.assertIn("Already at step 60 of 60: not training.", again.stderr)
        self.assert_bit_identical(model_dir)

    def test_sigterm_saves_exits_42_and_resumes(self):
        """SIGTERM at step 30: a checkpoint at the next loop boundary, exit 42, exact resume."""
        model_dir = os.path.join(self.root, "preempted")
        preempted = run_process(model_dir, SIGTERM_AT_STEP="30")
        self.assertEqual(preempted.returncode, 42, preempted.stderr[-2000:])
        self.assertIn("trainer: Preempted (SIGTERM): saved step 35", preempted.stderr)
        self.assertEqual(tf.train.latest_checkpoint(model_dir), os.path.join(model_dir, "ckpt-35"))
        resumed = run_here(model_dir)
        self.assertEqual(resumed.returncode, 0, resumed.stderr[-2000:])
        self.assert_bit_identical(model_dir)

    def test_sigterm_under_mirrored_strategy(self):
        """The same preemption with 2 mirrored replicas: saved, exit 42, resumed to the end."""
        model_dir = os.path.join(self.root, "mirrored")
        flags = ["--strategy=mirrored", "--cpu_replicas=2"]
        preempted = run_process(model_dir, *flags, SIGTERM_AT_STEP="20")
        self.assertEqual(preempted.returncode, 42, preempted.stderr[-2000:])
        self.assertIn("with 2 replica(s)", preempted.stderr)
        resumed = run_here(model_dir, *flags)
        self.assertEqual(resumed.returncode, 0, resumed.stderr[-2000:])
        self.assertIn("ckpt-25", resumed.stderr)
        self.assertIn("step 60", resumed.stderr)

    def test_sigkill_under_mirrored_in_memory_then_resume_is_bit_identical(self):
        """2 mirrored replicas gathering their halves of in-memory batches in the loop: SIGKILL
        at step 40 (after the checkpoint at 25), rerun: every weight and the dropout seed state
        equal, bit for bit, those of the same run unbroken."""
        flags = ("--task=resume_memory", "--strategy=mirrored", "--cpu_replicas=2")
        unbroken = os.path.join(self.root, "unbroken")
        done = run_here(unbroken, *flags)
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        model_dir = os.path.join(self.root, "killed")
        killed = run_process(model_dir, *flags, KILL_AT_STEP="40")
        self.assertEqual(killed.returncode, -9, killed.stderr[-2000:])
        resumed = run_here(model_dir, *flags)
        self.assertEqual(resumed.returncode, 0, resumed.stderr[-2000:])
        self.assertIn("ckpt-25", resumed.stderr)
        got, want = checkpoint_weights(model_dir), checkpoint_weights(unbroken)
        self.assertGreaterEqual(len(want), 7)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


class Poison(Penalty):
    """A penalty that turns infinite from its `at`-th evaluation on (an exploding term)."""

    has_loss = True

    def __init__(self, at):
        super().__init__(name="poison")
        self.at = at
        self.calls = tf.Variable(0)

    def loss(self, variables):
        if tf.inside_function():  # the train steps' calls, not Trainer.build's eager check
            self.calls.assign_add(1)
        return tf.where(self.calls >= self.at, np.inf, 0.0) + 0.0 * tf.add_n(
            [tf.reduce_sum(v) for v in variables]
        )


class FailureTest(parameterized.TestCase, tf.test.TestCase):
    def make_task(self, model_dir, x=None, y=None, **kwargs):
        if x is None:
            x, y = regression_data(n=64)
        options = TrainerOptions(batch_size=8, train_steps=40, steps_per_loop=10,
                                 checkpoint_every=10, model_dir=model_dir)  # fmt: skip
        return ArrayTask(x, y, options, **kwargs)

    def test_nan_in_data_names_data_loss_and_keeps_checkpoints_finite(self):
        """A NaN example in batch 26: stop at step 26 naming data_loss; ckpt-20 is finite."""
        model_dir = self.create_tempdir().full_path
        x, y = regression_data(n=256)
        x[25 * 8] = np.nan  # the first example of the 26th batch of 8 (step 26)
        with self.assertRaisesRegex(FloatingPointError, r"at step 26: data_loss=nan"):
            self.make_task(model_dir, x, y).train()
        self.assertEqual(tf.train.latest_checkpoint(model_dir), os.path.join(model_dir, "ckpt-20"))
        for w in checkpoint_weights(model_dir):
            self.assertTrue(np.all(np.isfinite(w)))

    def test_exploding_penalty_is_named(self):
        model_dir = self.create_tempdir().full_path
        task = self.make_task(model_dir, penalties=[Poison(at=13)])
        with self.assertRaisesRegex(FloatingPointError, r"at step 13: penalty/poison=inf;"):
            task.train()
        self.assertEqual(tf.train.latest_checkpoint(model_dir), os.path.join(model_dir, "ckpt-10"))

    def test_non_finite_weights_are_never_saved(self):
        model_dir = self.create_tempdir().full_path
        task = self.make_task(model_dir)
        task.train()
        checkpointer = make_checkpointer(task, model_dir)
        task.model.layers[0].kernel.assign(np.full((4, 3), np.nan, np.float32))
        with self.assertRaisesRegex(FloatingPointError, r"'net/hidden/kernel'; not saving"):
            checkpointer.save(99)
        self.assertEqual(tf.train.latest_checkpoint(model_dir), os.path.join(model_dir, "ckpt-40"))

    def test_other_task_or_model_is_refused(self):
        """A model_dir of another task, or of a differently shaped model: one clear line."""
        model_dir = self.create_tempdir().full_path
        self.make_task(model_dir).train()

        class OtherTask(ArrayTask):
            pass

        with self.assertRaisesRegex(
            ConfigError, r"holds a run of task 'ArrayTask', not 'OtherTask'"
        ):
            OtherTask(*regression_data(n=64), TrainerOptions(model_dir=model_dir)).train()

        def wider():
            return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="hidden"),
                                     keras.layers.Dense(2, name="out")], name="net")  # fmt: skip

        with self.assertRaisesRegex(
            ConfigError, r"different model \(.*net/hidden/kernel: \[4, 3\] -> \[4, 5\]"
        ):
            self.make_task(model_dir, model_fn=wider).train()

    def test_damaged_latest_checkpoint_is_reported_and_resume_from_works(self):
        model_dir = self.create_tempdir().full_path
        task = self.make_task(model_dir)
        task.train()
        data = os.path.join(model_dir, "ckpt-40.data-00000-of-00001")
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
        with self.assertRaisesRegex(
            ConfigError, r"ckpt-40' is unreadable .*--resume_from=.*ckpt-30"
        ):
            self.make_task(model_dir).train()
        resumed = ArrayTask(*regression_data(n=64), TrainerOptions(
            batch_size=8, train_steps=40, steps_per_loop=10, checkpoint_every=10,
            model_dir=model_dir, resume_from=os.path.join(model_dir, "ckpt-30")))  # fmt: skip
        result = resumed.train()
        self.assertEqual(result.step, 40)
        for a, b in zip(resumed.model.get_weights(), task.model.get_weights()):
            self.assertAllClose(a, b, atol=1e-6)

    def test_export_reloads_with_the_same_predictions(self):
        root = self.create_tempdir().full_path
        x, y = regression_data(n=64)
        task = ArrayTask(x, y, TrainerOptions(batch_size=8, train_steps=10,
                                              export_dir=os.path.join(root, "export")))  # fmt: skip
        task.train()
        reloaded = tf.saved_model.load(os.path.join(root, "export"))
        self.assertAllClose(reloaded.serve(x), task.model(x), atol=1e-6)

    def test_checkpoint_holds_every_model_variable(self):
        """The model's variables are listed explicitly (Keras 3 misses some otherwise)."""
        model_dir = self.create_tempdir().full_path
        model = small_model()
        Checkpointer(model_dir, task="t", model_variables=model.variables, objects={}).save(1)
        self.assertLen(checkpoint_weights(model_dir), len(model.variables))
        self.assertIsInstance(Preempted(3, "p"), Exception)


class UrlModelDirTest(tf.test.TestCase):
    """A `model_dir` URL (here TensorFlow's in-memory `ram://`) holds the whole run."""

    def test_ram_model_dir_trains_resumes_and_holds_every_file(self):
        workdir = self.create_tempdir().full_path
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(workdir)  # a local `ram:` folder would appear here
        model_dir = f"ram://tapeloop_{random.randrange(2**32)}/run"
        x, y = regression_data(n=64)

        def options(**kwargs):
            return TrainerOptions(batch_size=8, steps_per_loop=10, checkpoint_every=10, **kwargs)

        ArrayTask(x, y, options(train_steps=20, model_dir=model_dir)).train()
        resumed = ArrayTask(x, y, options(train_steps=30, model_dir=model_dir))
        with self.assertLogs(logger="absl", level="INFO") as logs:
            result = resumed.train()
        self.assertIn(f"Restored {model_dir}/ckpt-20", "\n".join(logs.output))
        self.assertEqual(result.step, 30)
        straight = ArrayTask(x, y, options(train_steps=30))
        straight.train()
        for a, b in zip(resumed.model.get_weights(), straight.model.get_weights()):
            self.assertAllClose(a, b, rtol=1e-5, atol=1e-6)

        with tf.io.gfile.GFile(f"{model_dir}/results.json") as f:
            self.assertEqual(json.load(f)["step"], 30)
        files = set(tf.io.gfile.listdir(model_dir))
        self.assertContainsSubset({"results.json", "tapeloop.json", "checkpoint"}, files)
        self.assertEqual([f for f in files if ".tmp-" in f or "write_test" in f], [])
        self.assertEqual(os.listdir(workdir), [])

    def test_results_json_is_strict_json(self):
        """A NaN metric is written as null: strict JSON readers accept the file."""
        model_dir = self.create_tempdir().full_path
        path = os.path.join(model_dir, "results.json")
        write_json(path, {"eval": {"loss": float("nan"), "accuracy": 0.5}})

        def reject(constant):
            raise ValueError(f"non-standard JSON constant {constant}")

        with open(path) as f:
            self.assertEqual(
                json.loads(f.read(), parse_constant=reject),
                {"eval": {"loss": None, "accuracy": 0.5}},
            )


if __name__ == "__main__":
    tf.test.main()
