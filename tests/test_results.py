"""results.json as the run goes: after SIGKILLs, preemption, a full disk at export and reruns it
holds every evaluation once, as an unbroken run made them; a damaged one is refused and left as
it is; steps_per_sec is the train loops' rate, evaluations and checkpoints timed apart."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, ClassVar
from unittest import mock

import numpy as np
import tensorflow as tf
from absl.testing import absltest
from array_task import ArrayTask, regression_data
from cli_runner import FIXTURES_DIR, REPO_DIR, context, last_line
from test_resume import ResumeTestCase

from tasks.synthetic import SyntheticRegression
from trainer import TrainerOptions, register_task
from trainer.run import files, records
from trainer.run.checkpointing import Checkpointer
from trainer.run.controller import RESULTS_SCHEMA

TIMEOUT_S = 120
# Evaluations every loop, checkpoints every other one, 200 steps of the default task (without
# XLA: its compilation would double each process's first loop).
FLAGS = ("--train_steps=200", "--steps_per_loop=10", "--eval_every=10",
         "--checkpoint_every=20", "--deterministic", "--jit_compile=False")  # fmt: skip


@register_task("signalled_synthetic")
class SignalledSynthetic(SyntheticRegression):
    """`synthetic`, sending itself a signal while evaluating at a step:
    `RESULTS_SIGNAL_AT=50:SIGTERM`."""

    def evaluate(self, dataset=None):
        step, _, name = os.environ.get("RESULTS_SIGNAL_AT", "").partition(":")
        if step == str(self.step):
            os.kill(os.getpid(), signal.Signals[name])
        return super().evaluate(dataset)


def read_results(model_dir: str) -> dict[str, Any]:
    """`model_dir`'s results.json, checked by structure."""
    return records.read(os.path.join(model_dir, "results.json"), RESULTS_SCHEMA)


def stamp(path: str) -> tuple[int, int] | None:
    """What changes when `path` is replaced (written atomically), None while it is absent."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


class ResultsTestCase(ResumeTestCase):
    _reference: ClassVar[str | None] = None  # an unbroken run of FLAGS, trained once per class

    def reference(self) -> str:
        """The directory of an unbroken run of FLAGS (read it, do not write it)."""
        if ResultsTestCase._reference is None:
            root = tempfile.mkdtemp()
            ResultsTestCase.addClassCleanup(shutil.rmtree, root, ignore_errors=True)
            self.cli(*FLAGS, f"--model_dir={root}/run")
            ResultsTestCase._reference = f"{root}/run"
        return ResultsTestCase._reference

    def reference_results(self) -> dict[str, Any]:
        results = read_results(self.reference())
        self.assertEqual([h["step"] for h in results["history"]], list(range(10, 201, 10)))
        return results

    def copy_of_reference(self) -> str:
        model_dir = os.path.join(self.model_dir(), "run")
        shutil.copytree(self.reference(), model_dir)
        return model_dir


class KilledAndResumedTest(ResultsTestCase):
    def start_and_kill(self, model_dir: str, delay: float) -> tuple[int, str]:
        """Starts `python -m trainer FLAGS`, kills it (SIGKILL) `delay` seconds after it first
        writes results.json (so it has trained); returns its exit status (0 if it finished
        first) and the end of its output."""
        path = os.path.join(model_dir, "results.json")
        before = stamp(path)
        log = tempfile.TemporaryFile("w+")
        self.addCleanup(log.close)
        path_list = os.pathsep.join([FIXTURES_DIR, os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": path_list}
        process = subprocess.Popen(
            [sys.executable, "-m", "trainer", *FLAGS, f"--model_dir={model_dir}"],
            cwd=REPO_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.addCleanup(stop, process)
        deadline = time.monotonic() + TIMEOUT_S
        while stamp(path) == before and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        status = process.wait(timeout=TIMEOUT_S)
        log.seek(0)
        return status, log.read()[-3000:]

    def test_sigkill_at_a_random_moment_then_rerun_keeps_every_evaluation_once(self):
        """A SIGKILL at a random moment (in a loop, an evaluation, a checkpoint or writing
        results.json), seeded anew on each run and named in every failure (set
        `RESULTS_KILL_SEED` to replay one): results.json holds a beginning of the unbroken run's
        history; after the rerun that finishes, all of it, step for step and value for value.
        One kill per run (three cost two more processes); over CI runs the moments vary."""
        reference = self.reference_results()
        model_dir = os.path.join(self.model_dir(), "run")
        seed = int(os.environ.get("RESULTS_KILL_SEED", random.randrange(10**6)))
        delay = random.Random(seed).uniform(0.05, 0.4)
        moment = f"RESULTS_KILL_SEED={seed}: {delay:.3f} s after results.json was first written"
        status, output = self.start_and_kill(model_dir, delay)
        self.assertEqual(status, -signal.SIGKILL, f"{moment}: {output}")
        written = read_results(model_dir)
        killed = [written["step"]]
        history = written["history"]
        self.assertEqual(history, reference["history"][: len(history)], moment)
        self.cli(*FLAGS, f"--model_dir={model_dir}")
        final = read_results(model_dir)
        self.assertEqual(final["history"], reference["history"], f"{moment}, at step {killed}")
        for key in ("step", "eval", "best", "stopped_early", "train"):
            self.assertEqual(final[key], reference[key], key)
        self.assertEqual([f for f in os.listdir(model_dir) if ".tmp-" in f], [])


class PreemptedAndResumedTest(ResultsTestCase):
    def test_sigterm_then_rerun_keeps_every_evaluation_once(self):
        """SIGTERM while evaluating at step 50: the run evaluates at step 60 (due there),
        writes results.json, saves and exits 42; the rerun resumes from step 60 and ends at
        100 with every evaluation the unbroken run made up to there, once."""
        reference = self.reference_results()
        model_dir = os.path.join(self.model_dir(), "run")
        common = (*FLAGS, "--train_steps=100", "--task=signalled_synthetic",
                  f"--model_dir={model_dir}")  # fmt: skip
        with mock.patch.dict(os.environ, {"RESULTS_SIGNAL_AT": "50:SIGTERM"}):
            preempted = self.cli(*common, status=42)
        self.assertStartsWith(last_line(preempted.stderr),
                              "trainer: Preempted (SIGTERM): saved step 60")  # fmt: skip
        written = read_results(model_dir)
        self.assertEqual(written["step"], 60)
        self.assertEqual(written["history"], reference["history"][:6])
        resumed = self.cli(*common)
        self.assertIn(f"Restored {model_dir}/ckpt-60", resumed.stderr)
        self.assertEqual(read_results(model_dir)["history"], reference["history"][:10])


class FaultsAndRerunsTest(ResultsTestCase):
    def test_full_disk_at_export_leaves_results_and_the_rerun_keeps_them(self):
        """The export to a 64 kB file system fails (one line, exit 1) after training: the
        history is in results.json; rerun with room to export, the results are unchanged."""
        mount_point = self.create_tempdir().full_path
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs",
                                  mount_point], capture_output=True, check=False)  # fmt: skip
        if mounted.returncode:
            self.skipTest(f"cannot mount a small tmpfs here: {mounted.stderr.strip()[:100]}")
        self.addCleanup(subprocess.run, ["umount", mount_point], check=False)
        model_dir = os.path.join(self.model_dir(), "run")
        common = (*FLAGS, "--train_steps=40", f"--model_dir={model_dir}")
        full = self.cli(*common, f"--export_dir={mount_point}/export", status=1)
        self.assertStartsWith(last_line(full.stderr), "trainer: Could not write the model to")
        written = read_results(model_dir)
        self.assertEqual(written["step"], 40)
        self.assertEqual(written["history"], self.reference_results()["history"][:4])
        export_dir = os.path.join(self.model_dir(), "export")
        rerun = self.cli(*common, f"--export_dir={export_dir}")
        self.assertIn("Already at step 40 of 40: not training.", rerun.stderr)
        self.assertTrue(os.path.exists(os.path.join(export_dir, "saved_model.pb")))
        self.assertEqual(read_results(model_dir), written)

    def test_rerunning_a_finished_or_early_stopped_run_keeps_its_results(self):
        """A rerun that trains no step leaves results.json as it was: eval, best, history,
        stopped_early and the times of the run that trained."""
        finished = self.copy_of_reference()
        before = read_results(finished)
        self.cli(*FLAGS, f"--model_dir={finished}")
        self.assertEqual(read_results(finished), before)

        stopped = os.path.join(self.model_dir(), "run")
        early = ("--train_steps=1000", "--steps_per_loop=20", "--eval_every=20",
                 "--early_stop_patience=2", f"--model_dir={stopped}")  # fmt: skip
        self.cli(*early)
        before = read_results(stopped)
        self.assertTrue(before["stopped_early"])
        self.assertLess(before["step"], 1000)
        self.assertEqual(before["eval"], {"loss": before["history"][-1]["loss"]})
        self.assertIn(before["best"], before["history"])
        rerun = self.cli(*early)
        self.assertIn("Stopped early before", rerun.stderr)
        self.assertEqual(read_results(stopped), before)

    def test_results_lost_or_older_than_the_checkpoint_is_one_warning_and_the_run_goes_on(self):
        """results.json removed, or put back from step 100, beside ckpt-200: one warning line
        naming the steps; the run goes on to 220 and keeps what the file still held."""
        reference = self.reference_results()
        older = {**reference, "step": 100, "history": reference["history"][:10]}
        for content, warning, kept in (
            (None, "results.json is missing: the results up to step 200", []),
            (older, "results.json ends at step 100, before the checkpoint resumed from (step 200)",
             reference["history"][:10]),
        ):  # fmt: skip
            with self.subTest(warning=warning):
                model_dir = self.copy_of_reference()
                path = os.path.join(model_dir, "results.json")
                os.remove(path)
                if content is not None:
                    files.write_json(path, content)
                resumed = self.cli(*FLAGS, "--train_steps=220", f"--model_dir={model_dir}")
                lines = [x for x in resumed.stderr.splitlines() if "cannot be recovered" in x]
                self.assertLen(lines, 1, context(resumed))
                self.assertIn(warning, lines[0])
                history = read_results(model_dir)["history"]
                self.assertEqual(history[:-2], kept)
                self.assertEqual([h["step"] for h in history[-2:]], [210, 220])


class DamagedResultsTest(ResultsTestCase):
    CASES: ClassVar[list[tuple[str, str]]] = [
        ('{"step": 200, "history": 3}', "field `history` should be a list, not an integer (3)"),
        ('{"step": 200, "history": [{"step": "10", "loss": 1.0}]}',
         "field `history[0].step` should be an integer, not a string ('10')"),
        ('{"step": 200, "eval": {"loss": "low"}}', "field `eval.loss` should be a number or null"),
        ('{"step": 200, "best": [10]}', "field `best` should be an object or null, not a list"),
        ('[{"step": 200}]', "its top level should be an object, not a list"),
        ('{"step": 200, "history": [', "is not valid JSON"),
    ]  # fmt: skip

    def assert_refused(self, model_dir: str, content: str, message: str) -> None:
        path = os.path.join(model_dir, "results.json")
        with open(path, "w") as f:
            f.write(content)
        result = self.cli(*FLAGS, f"--model_dir={model_dir}", status=2)
        line = last_line(result.stderr)
        self.assertStartsWith(line, f"trainer: error: {path!r}", context(result))
        self.assertIn(message, line)
        self.assertLen([x for x in result.stderr.splitlines() if "trainer:" in x], 1)
        with open(path) as f:
            self.assertEqual(f.read(), content)

    def test_damaged_results_are_one_line_exit_2_and_left_as_they_are(self):
        model_dir = self.copy_of_reference()
        for content, message in self.CASES:
            with self.subTest(content=content):
                self.assert_refused(model_dir, content, message)

    def test_damaged_results_without_a_checkpoint_are_refused_too(self):
        model_dir = self.model_dir()
        self.assert_refused(model_dir, *self.CASES[0])
        self.assertIsNone(tf.train.latest_checkpoint(model_dir))


class PoisonedOnce(ArrayTask):
    """The loss is infinite from step `poison_from` on while the learning rate is 0.1: a
    blow-up after which a rollback (rate halved) goes on."""

    poison_from = 35

    def compute_loss(self, labels, outputs):
        loss = super().compute_loss(labels, outputs)
        bad = (self.optimizer.iterations >= self.poison_from) & (
            self.optimizer.learning_rate > 0.06
        )
        return tf.where(bad, tf.fill(tf.shape(loss), np.inf), loss)


class SlowEval(ArrayTask):
    """Each evaluation sleeps `SLEEP_S` first."""

    SLEEP_S = 0.25

    def evaluate(self, dataset=None):
        time.sleep(self.SLEEP_S)
        return super().evaluate(dataset)


def options(**kwargs) -> TrainerOptions:
    base = {"optimizer": "sgd", "learning_rate": 0.1, "batch_size": 16, "summary_every": 0}
    return TrainerOptions(**{**base, **kwargs})


class InProcessTest(ResumeTestCase):
    def test_each_checkpoint_follows_results_at_its_step_and_a_rollback_drops_what_it_undoes(
        self,
    ):
        """Evaluations at 10, 20, 30; the loop to 40 blows up; back to ckpt-20: results.json
        is written then with the history to 20; the run ends with each step once, 30 evaluated
        again. Every checkpoint is saved right after results.json is written at its step (a
        kill between the two leaves no evaluation out of the file)."""
        model_dir = self.model_dir()
        x, y = regression_data()
        task = PoisonedOnce(x, y, options(train_steps=60, steps_per_loop=10, eval_every=10,
                                          checkpoint_every=20, model_dir=model_dir,
                                          on_nonfinite="rollback"))  # fmt: skip
        events = []
        write_json, save = files.write_json, Checkpointer.save

        def write_spy(path, value):
            if path.endswith("results.json"):
                events.append(("results", value["step"], [h["step"] for h in value["history"]]))
            write_json(path, value)

        def save_spy(checkpointer, step):
            events.append(("checkpoint", step))
            return save(checkpointer, step)

        with (
            mock.patch.object(files, "write_json", write_spy),
            mock.patch.object(Checkpointer, "save", save_spy),
        ):
            result = task.train()
        self.assertEqual(result.rollbacks, 1)
        self.assertIn(("results", 20, [10, 20]), events[events.index(("checkpoint", 20)) + 1 :])
        self.assertEqual([h["step"] for h in result.history], [10, 20, 30, 40, 50, 60])
        self.assertEqual(read_results(model_dir)["history"], result.history)
        saves = [i for i, e in enumerate(events) if e[0] == "checkpoint"]
        self.assertEqual([events[i][1] for i in saves], [20, 40, 60])
        for i in saves:
            step = events[i][1]
            self.assertEqual(events[i - 1][:2], ("results", step))
            self.assertEqual(events[i - 1][2], list(range(10, step + 1, 10)))

    def test_steps_per_sec_is_the_loops_rate_and_evaluations_are_timed_apart(self):
        """Evaluations that sleep 0.25 s each: eval_sec holds the sleeps; steps_per_sec is at
        least the steps after the first loop over what is left of the whole run's time
        without the first loop, the evaluations and the checkpoints (with the 1.25 s of
        sleeps in it, as before, it was well below)."""
        x, y = regression_data()
        task = SlowEval(x, y, options(train_steps=200, steps_per_loop=20, eval_every=40,
                                      checkpoint_every=40, model_dir=self.model_dir()))  # fmt: skip
        task.model  # noqa: B018  built before the clock starts
        start = time.perf_counter()
        result = task.train()
        whole = time.perf_counter() - start
        with open(os.path.join(task.options.model_dir, "results.json")) as f:
            self.assertEqual(json.load(f), json.loads(json.dumps(result.to_dict())))
        evaluations = len(result.history)
        self.assertEqual(evaluations, 5)
        self.assertGreaterEqual(result.eval_sec, evaluations * SlowEval.SLEEP_S)
        self.assertGreater(result.checkpoint_sec, 0.0)
        self.assertGreater(result.first_loop_sec, 0.0)
        rest = whole - result.first_loop_sec - result.eval_sec - result.checkpoint_sec
        self.assertGreater(rest, 0.0)
        self.assertGreaterEqual(result.steps_per_sec, (200 - 20) / rest)


if __name__ == "__main__":
    absltest.main()
