"""Resume and faults through the CLI (run in this process), where users meet them: the flags
given now are in force, nothing is lost in silence, one run per model_dir, every I/O fault one
line."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from typing import ClassVar

import numpy as np
import tensorflow as tf
from absl.testing import absltest
from array_task import ArrayTask, regression_data
from cli_runner import CliResult, context, last_line, run_cli

from trainer import TrainerOptions
from trainer.errors import ConfigError
from trainer.run.lock import REFRESH_S, RunLock


def final_weights(model_dir: str) -> list[np.ndarray]:
    """The model variables of the latest checkpoint in `model_dir`, in model order."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir))
    keys = sorted(
        (k for k in reader.get_variable_to_shape_map() if k.startswith("model_variables/")),
        key=lambda k: int(k.split("/")[1]),
    )
    return [reader.get_tensor(k) for k in keys]


def scalars(model_dir: str, tag: str) -> dict[int, float]:
    """`tag`'s values by step from the TensorBoard event files in `model_dir`."""
    values = {}
    for path in tf.io.gfile.glob(os.path.join(model_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


class ResumeTestCase(absltest.TestCase):
    def cli(self, *args: str, status: int = 0) -> CliResult:
        """`python -m trainer ARGS` in this process: exit `status`, no traceback.

        Without XLA unless ARGS say otherwise: compiling the loop, which these tests do not
        test (test_inputs and test_distribute do), would double a short run's time.
        """
        result = run_cli("--jit_compile=False", *args)
        self.assertEqual(result.returncode, status, context(result))
        self.assertNotIn("Traceback", result.stderr, context(result))
        return result

    def model_dir(self) -> str:
        return self.create_tempdir().full_path


class ExplicitResumeTest(ResumeTestCase):
    def test_strengths_by_name_and_learning_rate_given_now_are_in_force(self):
        """300 steps with l2(1e-2), l1(1e-5); resumed to 600 with the order swapped and l2 at
        1e-3: the loss terms over Σw² and Σ|w| of the saved weights are 1e-3 and 1e-5, and the
        learning_rate summaries show the new rate."""
        model_dir = self.model_dir()
        common = [f"--model_dir={model_dir}", "--checkpoint_every=100", "--steps_per_loop=10",
                  "--summary_every=10"]  # fmt: skip
        self.cli(*common, "--train_steps=300", "--penalty=l2(1e-2)", "--penalty=l1(1e-5)")
        resumed = self.cli(*common, "--train_steps=600", "--penalty=l1(1e-5)",
                           "--penalty=l2(1e-3)", "--learning_rate=2e-4")  # fmt: skip
        self.assertIn("l2.scale: 0.01 in the checkpointed run -> 0.001 now", resumed.stderr)
        self.assertIn("learning_rate: 0.001 in the checkpointed run -> 0.0002 now", resumed.stderr)
        self.assertIn("Restored", resumed.stderr)
        with open(os.path.join(model_dir, "results.json")) as f:
            train = json.load(f)["train"]  # the mean of steps 591-600
        weights = final_weights(model_dir)
        squares = sum(float(np.sum(w.astype(np.float64) ** 2)) for w in weights)
        absolute = sum(float(np.sum(np.abs(w.astype(np.float64)))) for w in weights)
        self.assertAlmostEqual(train["penalty/l2"] / squares / 1e-3, 1.0, delta=0.02)
        self.assertAlmostEqual(train["penalty/l1"] / absolute / 1e-5, 1.0, delta=0.02)
        rates = scalars(model_dir, "learning_rate")
        self.assertAlmostEqual(rates[300], 1e-3, delta=1e-9)
        self.assertAlmostEqual(rates[310], 2e-4, delta=1e-9)
        self.assertAlmostEqual(rates[600], 2e-4, delta=1e-9)

    def test_penalty_added_is_allowed_and_another_optimizer_refused(self):
        model_dir = self.model_dir()
        self.cli(f"--model_dir={model_dir}", "--train_steps=100", "--penalty=l2sp(1e-3)")
        added = self.cli(f"--model_dir={model_dir}", "--train_steps=200", "--penalty=l2sp(1e-3)",
                         "--penalty=decoupled_weight_decay(1e-2)")  # fmt: skip
        self.assertIn("penalty decoupled_weight_decay added: DecoupledWeightDecay(rate=0.01)",
                      added.stderr)  # fmt: skip
        refused = self.cli(f"--model_dir={model_dir}", "--train_steps=300", "--optimizer=sgd",
                           status=2)  # fmt: skip
        line = last_line(refused.stderr)
        self.assertStartsWith(line, "trainer: error: The checkpointed run used optimizer Adam")
        self.assertIn("this one SGD", line)

    def test_a_new_batch_size_restarts_a_tf_data_input(self):
        """A saved tf.data iterator yields batches of the old size: with a new batch size (or
        seed) the input starts over, as logged, instead of failing inside the loop."""
        model_dir = self.model_dir()
        x, y = regression_data(n=64)
        ArrayTask(x, y, TrainerOptions(batch_size=8, train_steps=20, model_dir=model_dir)).train()
        resumed = ArrayTask(x, y, TrainerOptions(batch_size=16, train_steps=40,
                                                 model_dir=model_dir))  # fmt: skip
        with self.assertLogs(logger="absl", level="INFO") as logs:
            self.assertEqual(resumed.train().step, 40)
        text = "\n".join(logs.output)
        self.assertIn("batch_size: 8 in the checkpointed run -> 16 now", text)
        self.assertIn("batch_size changed: the input iterator starts over", text)


class NothingLostTest(ResumeTestCase):
    _finished: ClassVar[dict[int, str]] = {}  # steps -> a finished run, trained once per class

    def trained(self, steps: int = 300) -> str:
        """A copy, of this test's own, of a finished run of `steps` steps."""
        if steps not in self._finished:
            source = tempfile.mkdtemp()
            type(self).addClassCleanup(shutil.rmtree, source, ignore_errors=True)
            self.cli(f"--model_dir={source}/run", f"--train_steps={steps}",
                     "--checkpoint_every=100", "--eval_every=100")  # fmt: skip
            self._finished[steps] = f"{source}/run"
        model_dir = os.path.join(self.model_dir(), "run")
        shutil.copytree(self._finished[steps], model_dir)
        return model_dir

    def test_missing_state_file_is_rebuilt_a_damaged_one_left_until_removed(self):
        """Missing: rebuilt from the files (it was lost). Garbled or empty: exit 2, the file
        unchanged (the message says what removing it does); removed, it is rebuilt."""
        for content in ("garbage {{{", "", None):
            with self.subTest(content=content):
                model_dir = self.trained()
                state = os.path.join(model_dir, "checkpoint")
                if content is None:
                    os.remove(state)
                else:
                    with open(state, "w") as f:
                        f.write(content)
                    refused = self.cli(f"--model_dir={model_dir}", "--train_steps=400",
                                       "--checkpoint_every=100", status=2)  # fmt: skip
                    self.assertIn(f"{state!r} is damaged", last_line(refused.stderr))
                    self.assertIn(f"it would name {model_dir}/ckpt-300, the newest readable",
                                  last_line(refused.stderr))  # fmt: skip
                    with open(state) as f:
                        self.assertEqual(f.read(), content)
                    os.remove(state)  # as the message says
                result = self.cli(f"--model_dir={model_dir}", "--train_steps=400",
                                  "--checkpoint_every=100")  # fmt: skip
                self.assertIn("rebuilt it from the files", result.stderr)
                self.assertIn(f"Restored {model_dir}/ckpt-300", result.stderr)
                self.assertEqual(tf.train.latest_checkpoint(model_dir),
                                 os.path.join(model_dir, "ckpt-400"))  # fmt: skip
                for step in (100, 200, 300):  # recovered ones are kept, never rotated out
                    self.assertTrue(os.path.exists(f"{model_dir}/ckpt-{step}.index"), step)

    def test_damaged_checkpoints_never_point_to_a_bad_one(self):
        """Every .data file damaged: --resume_from names no other (bad) checkpoint; one damaged:
        the hint names the newest readable one."""
        model_dir = self.trained()
        for step in (100, 200, 300):
            data = os.path.join(model_dir, f"ckpt-{step}.data-00000-of-00001")
            with open(data, "r+b") as f:
                f.truncate(os.path.getsize(data) // 2)
        refused = self.cli(f"--model_dir={model_dir}", "--train_steps=400",
                           f"--resume_from={model_dir}/ckpt-200", status=2)  # fmt: skip
        self.assertIn("ckpt-200' is unreadable", last_line(refused.stderr))
        self.assertIn("no other one is readable", last_line(refused.stderr))
        other = self.trained()
        data = os.path.join(other, "ckpt-300.data-00000-of-00001")
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
        hint = self.cli(f"--model_dir={other}", "--train_steps=400", status=2)
        self.assertIn(f"--resume_from={other}/ckpt-200", last_line(hint.stderr))

    def test_rerunning_a_finished_run_keeps_its_results(self):
        model_dir = self.trained()
        path = os.path.join(model_dir, "results.json")
        with open(path) as f:
            before = json.load(f)
        self.assertEqual([h["step"] for h in before["history"]], [100, 200, 300])
        self.cli(f"--model_dir={model_dir}", "--train_steps=300")
        with open(path) as f:
            after = json.load(f)
        self.assertEqual(after["history"], before["history"])
        self.assertEqual(after["train"], before["train"])

    def test_stale_temporary_checkpoint_folders_are_removed(self):
        model_dir = self.trained(100)
        stale = os.path.join(model_dir, "ckpt-50_temp")
        os.makedirs(os.path.join(stale, "part-0"))
        self.cli(f"--model_dir={model_dir}", "--train_steps=200")
        self.assertFalse(os.path.exists(stale))

    def test_damaged_metadata_is_one_line(self):
        model_dir = self.trained(100)
        for content in ("", "{not json"):
            with open(os.path.join(model_dir, "tapeloop.json"), "w") as f:
                f.write(content)
            refused = self.cli(f"--model_dir={model_dir}", "--train_steps=200", status=2)
            self.assertIn("tapeloop.json' is not valid JSON", last_line(refused.stderr))


class LockTest(ResumeTestCase):
    def write_lock(self, model_dir: str, pid: int) -> None:
        os.makedirs(model_dir, exist_ok=True)
        with open(os.path.join(model_dir, "tapeloop.lock"), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": pid, "since": "earlier",
                       "updated": 0, "token": "other"}, f)  # fmt: skip

    def test_a_live_holder_is_named_and_a_dead_one_taken_over(self):
        model_dir = self.model_dir()
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        self.addCleanup(holder.kill)
        self.write_lock(model_dir, holder.pid)
        refused = self.cli(f"--model_dir={model_dir}", "--train_steps=10", status=2)
        self.assertIn(f"is in use by pid {holder.pid} on {socket.gethostname()} since earlier",
                      last_line(refused.stderr))  # fmt: skip
        holder.kill()
        holder.wait()
        taken = self.cli(f"--model_dir={model_dir}", "--train_steps=10")
        self.assertIn(f"Taking over the stale lock of pid {holder.pid}", taken.stderr)
        self.assertFalse(os.path.exists(os.path.join(model_dir, "tapeloop.lock")))
        self.assertNotIn("tapeloop.lock.takeover", os.listdir(model_dir))

    def test_a_second_lock_is_refused_naming_the_holder_until_released(self):
        model_dir = self.model_dir()
        first, second = RunLock(model_dir), RunLock(model_dir)
        first.acquire()
        with self.assertRaisesRegex(ConfigError, f"in use by pid {os.getpid()} on "
                                    f"{socket.gethostname()} since "):  # fmt: skip
            second.acquire()
        first.release()
        second.acquire()
        second.release()
        self.assertEqual(os.listdir(model_dir), [])

    def race(self, model_dir: str, takers: int) -> tuple[list[RunLock], list[str]]:
        """`takers` threads acquire a lock on `model_dir` at once: the winners, the refusals."""
        locks = [RunLock(model_dir) for _ in range(takers)]
        start, winners, refusals = threading.Barrier(takers), [], []

        def take(lock: RunLock) -> None:
            start.wait()
            try:
                lock.acquire()
                winners.append(lock)
            except ConfigError as e:
                refusals.append(str(e))

        threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return winners, refusals

    def test_racing_takers_exactly_one_wins(self):
        """Eight threads take one directory at once: free, then holding a dead pid's lock (all
        judge it stale and race to take it over); five rounds each."""
        dead = subprocess.Popen([sys.executable, "-c", ""])
        dead.wait()
        for round_ in range(10):
            model_dir = self.model_dir()
            if round_ % 2:
                self.write_lock(model_dir, dead.pid)
            winners, refusals = self.race(model_dir, 8)
            self.assertLen(winners, 1, (round_, refusals))
            self.assertLen(refusals, 7)
            self.assertIn(f"in use by pid {os.getpid()}", refusals[0])
            with open(winners[0].path) as f:
                self.assertEqual(json.load(f)["token"], winners[0]._token)
            winners[0].release()
            self.assertEqual(os.listdir(model_dir), [])

    def test_a_holder_whose_lock_was_taken_over_stops_refreshing_it(self):
        model_dir = self.model_dir()
        lock = RunLock(model_dir)
        lock.acquire()
        self.write_lock(model_dir, 1)  # another run's, as after a takeover
        lock._refreshed -= REFRESH_S
        with self.assertLogs(level="WARNING") as logs:
            lock.refresh()
        self.assertIn("is no longer this run's (it now names pid 1 on", "\n".join(logs.output))
        with open(lock.path) as f:
            self.assertEqual(json.load(f)["token"], "other")
        lock.release()
        self.assertTrue(os.path.exists(lock.path))

    def test_a_lock_on_a_url_directory(self):
        """`ram://`, through tf.io.gfile (write, then read back)."""
        model_dir = f"ram://{self.id()}"
        first = RunLock(model_dir)
        first.acquire()
        with self.assertRaisesRegex(ConfigError, f"in use by pid {os.getpid()}"):
            RunLock(model_dir).acquire()
        first.release()
        self.assertFalse(tf.io.gfile.exists(first.path))
        second = RunLock(model_dir)
        second.acquire()
        second.release()


class WriteFaultTest(ResumeTestCase):
    def test_unwritable_export_dir_describe_and_sweep_are_one_line_before_training(self):
        regular_file = self.create_tempfile("file").full_path
        bad = os.path.join(regular_file, "sub")
        for flags in (
            [f"--export_dir={bad}"],
            [f"--model_dir={bad}", "--describe"],
            [f"--model_dir={bad}", "--penalty=l2(1e-3)", "--sweep=l2.scale=0,1e-3"],
        ):
            with self.subTest(flags=flags):
                result = self.cli("--train_steps=100", *flags, status=2)
                self.assertIn(f"({bad!r}) is not writable", last_line(result.stderr))
                self.assertNotIn("step 100/100", result.stderr)

    def test_full_disk_is_one_line_and_exit_1(self):
        mount_point = self.create_tempdir().full_path
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs",
                                  mount_point], capture_output=True, check=False)  # fmt: skip
        if mounted.returncode:
            self.skipTest(f"cannot mount a small tmpfs here: {mounted.stderr.strip()[:100]}")
        self.addCleanup(subprocess.run, ["umount", mount_point], check=False)
        # The default task's model (83k float32 weights, with Adam's moments ~1 MB per
        # checkpoint) cannot fit in 400 kB.
        result = self.cli(f"--model_dir={mount_point}/run", "--train_steps=100", status=1)
        line = last_line(result.stderr)
        self.assertStartsWith(line, "trainer: Could not write checkpoint 100")
        self.assertIn("No space left", line)


if __name__ == "__main__":
    absltest.main()
