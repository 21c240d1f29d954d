"""Signals through the CLI: Ctrl-C saves and exits 130 (twice: at once); SIGTERM to one worker
stops every worker at the same step, and every worker resumes from the chief's checkpoint; a
missing peer or a signal ends the wait for peers."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import tensorflow as tf
from array_task import free_ports
from cli_runner import context, run_cli

from trainer.run.signals import StopSignals

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
FIXTURES_DIR = os.path.join(TESTS_DIR, "fixtures")
REPO_DIR = os.path.dirname(TESTS_DIR)
TIMEOUT_S = 120  # then SIGKILL: a worker waiting for its peer inside TensorFlow ignores SIGTERM
TASK = ("--import=dist_plugin", "--task=dist_regression")
CLI = (sys.executable, "-m", "trainer", *TASK)


def _sigint_by_default():
    """Children of a background job start with SIGINT ignored, and Python keeps it so."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tf_config(ports, index):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


class Cli:
    """`python -m trainer --import=dist_plugin --task=dist_regression ...` in the background,
    its stdout and stderr in `<name>.log`."""

    def __init__(self, test, out_dir, name, *flags, **env):
        self.path = os.path.join(out_dir, f"{name}.log")
        self.log = open(self.path, "w")
        test.addCleanup(self.log.close)
        self.start = time.monotonic()
        self.process = subprocess.Popen(
            [*CLI, *flags],
            cwd=REPO_DIR,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                 "PYTHONPATH": os.pathsep.join([FIXTURES_DIR, os.environ.get("PYTHONPATH", "")]),
                 **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=_sigint_by_default,
        )  # fmt: skip
        test.addCleanup(self.kill)

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def wait(self):
        """The exit status ("timeout" after TIMEOUT_S and a SIGKILL) and the log."""
        try:
            rc = self.process.wait(timeout=max(1, TIMEOUT_S - (time.monotonic() - self.start)))
        except subprocess.TimeoutExpired:
            self.kill()
            rc = "timeout"
        self.seconds = time.monotonic() - self.start
        return rc, self.text()

    def text(self):
        with open(self.path) as f:
            return f.read()

    def wait_for_line(self, text):
        while text not in self.text():
            if self.process.poll() is not None or time.monotonic() - self.start > TIMEOUT_S:
                self.fail_with(f"no line with {text!r}")
            time.sleep(0.1)

    def fail_with(self, message):
        self.kill()
        raise AssertionError(f"{message}; log:\n{self.text()[-3000:]}")


def trainer_lines(log):
    """The CLI's own lines (`trainer: ...`), without the logs."""
    return [line for line in log.splitlines() if line.startswith("trainer:")]


class CtrlCTest(tf.test.TestCase):
    def test_ctrl_c_saves_at_the_next_boundary_exits_130_and_resumes(self):
        """SIGINT at step 8 (loops of 2 steps): ckpt-10, one line, 130; a rerun (in this
        process: its process is not what is tested) ends at 40."""
        out = self.create_tempdir().full_path
        model_dir = os.path.join(out, "run")
        flags = [f"--model_dir={model_dir}", "--eval_every=4", "--steps_per_loop=2",
                 "--train_steps=40", "--checkpoint_every=100"]  # fmt: skip
        rc, log = Cli(self, out, "interrupted", *flags, SIGNAL_AT_STEP="8:SIGINT").wait()
        self.assertEqual(rc, 130, log[-3000:])
        self.assertEqual(
            trainer_lines(log),
            [f"trainer: Interrupted (SIGINT): saved step 10 to {model_dir}/ckpt-10; "
             "rerun to resume."],
        )  # fmt: skip
        self.assertNotIn("Traceback", log)
        self.assertEqual(tf.train.latest_checkpoint(model_dir), f"{model_dir}/ckpt-10")
        with open(os.path.join(model_dir, "results.json")) as f:  # written before the save
            self.assertEqual(json.load(f)["step"], 10)

        resumed = run_cli(*TASK, *flags)
        self.assertEqual(resumed.returncode, 0, context(resumed))
        self.assertIn(f"Restored {model_dir}/ckpt-10", resumed.stderr)
        with open(os.path.join(model_dir, "results.json")) as f:
            self.assertEqual(json.load(f)["step"], 40)

    def test_ctrl_c_twice_exits_at_once(self):
        """The second SIGINT comes 1 s into a loop of four 30 s batches: the process ends then,
        with 130 and one line, not at the loop's end."""
        out = self.create_tempdir().full_path
        cli = Cli(self, out, "twice", "--eval_every=4", "--steps_per_loop=4", "--train_steps=40",
                  SIGNAL_AT_STEP="4:SIGINT", SIGNAL_AGAIN_AFTER_S="1",
                  DIST_SLOW_AFTER_STEP="4")  # fmt: skip
        rc, log = cli.wait()
        self.assertEqual(rc, 130, log[-3000:])
        self.assertLess(cli.seconds, 60)
        self.assertEqual(
            trainer_lines(log),
            ["trainer: Interrupted again (SIGINT): exiting at once, without saving."],
        )
        self.assertNotIn("Traceback", log)

    def test_stop_signals_records_the_first_and_restores_handlers(self):
        """In this (main) thread: SIGTERM is recorded, not fatal; SIG_IGN stays ignored."""
        previous = signal.getsignal(signal.SIGTERM)
        ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.addCleanup(signal.signal, signal.SIGINT, ignored)
        with StopSignals() as stops:
            self.assertIs(signal.getsignal(signal.SIGINT), signal.SIG_IGN)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            self.assertEqual(stops.requested, signal.SIGTERM)
        self.assertIs(signal.getsignal(signal.SIGTERM), previous)


class WorkersTest(tf.test.TestCase):
    """2 worker processes of MultiWorkerMirroredStrategy (TF_CONFIG on 127.0.0.1)."""

    def start_workers(self, out, name, model_dirs, **env_of_worker1):
        """Workers 0 (the chief) and 1 with these `--model_dir`s, each writing its final
        weights to `<name><i>.npz`."""
        ports = free_ports(2)
        flags = ["--strategy=multi_worker", "--eval_every=2", "--steps_per_loop=2",
                 "--train_steps=16", "--deterministic"]  # fmt: skip
        envs = [{"TF_CONFIG": tf_config(ports, 0)},
                {"TF_CONFIG": tf_config(ports, 1), **env_of_worker1}]  # fmt: skip
        return [
            Cli(self, out, f"{name}{i}", *flags, f"--model_dir={model_dir}",
                DIST_WEIGHTS_OUT=os.path.join(out, f"{name}{i}.npz"), **env)
            for i, (model_dir, env) in enumerate(zip(model_dirs, envs))
        ]  # fmt: skip

    def weights(self, out, name):
        with np.load(os.path.join(out, f"{name}.npz")) as saved:
            return [saved[f"arr_{i}"] for i in range(len(saved.files))]

    def test_sigterm_to_one_worker_stops_both_and_both_resume_from_the_chiefs_checkpoint(self):
        """Each worker with its own model_dir (the same command on each host). Worker 1 gets
        SIGTERM at step 4: both stop at step 6 and exit 42, and only the chief's directory
        holds ckpt-6. Rerun, worker 1 takes the chief's state (step 6) and both end at step
        16 with the weights, bit for bit, of an uninterrupted run (whose workers share a
        model_dir, as on a shared file system)."""
        out = self.create_tempdir().full_path
        own_dirs = [os.path.join(out, "run0"), os.path.join(out, "run1")]
        reference = self.start_workers(out, "uninterrupted", [os.path.join(out, "shared")] * 2)
        preempted = self.start_workers(out, "preempted", own_dirs, SIGNAL_AT_STEP="4:SIGTERM")
        (rc0, log0), (rc1, log1) = [w.wait() for w in preempted]
        self.assertEqual((rc0, rc1), (42, 42), f"{log0[-2000:]}\n{log1[-2000:]}")
        self.assertEqual(
            trainer_lines(log0),
            [f"trainer: Preempted (SIGTERM to another worker): saved step 6 to "
             f"{own_dirs[0]}/ckpt-6; rerun to resume."],
        )  # fmt: skip
        self.assertEqual(
            trainer_lines(log1),
            ["trainer: Preempted (SIGTERM): the chief saved step 6 (this worker keeps no "
             "checkpoint); rerun every worker to resume."],
        )  # fmt: skip
        self.assertEqual(tf.train.latest_checkpoint(own_dirs[0]), f"{own_dirs[0]}/ckpt-6")
        self.assertIsNone(tf.train.latest_checkpoint(own_dirs[1]))

        (rc0, log0), (rc1, log1) = [w.wait() for w in self.start_workers(out, "resumed", own_dirs)]
        self.assertEqual((rc0, rc1), (0, 0), f"{log0[-2000:]}\n{log1[-2000:]}")
        self.assertIn(f"Restored {own_dirs[0]}/ckpt-6", log0)
        self.assertIn("Took the chief's state: step 6 (this worker had step 0).", log1)
        with open(os.path.join(own_dirs[0], "results.json")) as f:
            self.assertEqual(json.load(f)["step"], 16)
        self.assertFalse(os.path.exists(os.path.join(own_dirs[1], "results.json")))

        for rc, log in [w.wait() for w in reference]:
            self.assertEqual(rc, 0, log[-2000:])
        expected = self.weights(out, "uninterrupted0")
        for name in ("uninterrupted1", "resumed0", "resumed1"):
            for got, want in zip(self.weights(out, name), expected, strict=True):
                self.assertAllEqual(got, want, msg=name)

    def test_a_missing_peer_ends_the_wait_with_one_line(self):
        """Worker 0 alone, and worker 1 alone (in other clusters), --peer_timeout=1: each
        exits 75, naming the other's address. In this process: the wait ends before any
        strategy is made, and the missing peer's port is held bound but not listening, so that
        nothing can answer there (a strategy made here would wait for it forever)."""
        for i in range(2):
            ports = free_ports(2)
            with (
                socket.socket() as held,
                mock.patch.dict(os.environ, {"TF_CONFIG": tf_config(ports, i)}),
            ):
                held.bind(("127.0.0.1", ports[1 - i]))
                result = run_cli(*TASK, "--strategy=multi_worker", "--peer_timeout=1")
            self.assertEqual(result.returncode, 75, context(result))
            missing = f"worker {1 - i} at 127.0.0.1:{ports[1 - i]}"
            self.assertEqual(
                trainer_lines(result.stderr),
                ["trainer: Other tasks did not start within `peer_timeout` (1 s): "
                 f"{missing}; start them, or check the addresses in TF_CONFIG."],
            )  # fmt: skip

    def test_sigint_and_sigterm_end_the_wait_for_a_peer(self):
        """Waiting without a timeout: SIGINT exits 130 with one line, SIGTERM ends it."""
        out = self.create_tempdir().full_path
        flags = ["--strategy=multi_worker", "--peer_timeout=0"]
        waiting = {
            sig: Cli(self, out, sig.name, *flags, TF_CONFIG=tf_config(free_ports(2), 0))
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        for sig, cli in waiting.items():
            cli.wait_for_line("Waiting for worker 1 at 127.0.0.1:")
            cli.process.send_signal(sig)
            sent = time.monotonic()
            rc, log = cli.wait()
            self.assertLess(time.monotonic() - sent, 10)
            self.assertNotIn("Traceback", log)
            if sig == signal.SIGINT:
                self.assertEqual(rc, 130, log[-3000:])
                self.assertEqual(
                    trainer_lines(log),
                    [
                        "trainer: Interrupted (SIGINT) while building the trainer; nothing was "
                        "trained."
                    ],
                )
            else:
                self.assertEqual(rc, -signal.SIGTERM, log[-3000:])


if __name__ == "__main__":
    tf.test.main()
