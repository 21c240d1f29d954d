"""Ctrl-C at any moment of `python -m trainer` and `tapeloop`: one line, exit status 130.

Real SIGINTs go to processes at moments of their start-up (each imports TensorFlow, seconds:
they run side by side); Ctrl-Cs at the later stages are simulated in this process, by a
KeyboardInterrupt raised where a real one would land, to check each stage's line.
"""

import configparser
import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import keras
import tensorflow as tf
from absl.testing import absltest, parameterized
from cli_runner import FIXTURES_DIR, REPO_DIR, CliTestCase, context, last_line, run_cli

from trainer.run import controller
from trainer.step.trainer import Trainer

TIMEOUT_S = 120
LONG_RUN = ("--train_steps=100000", "--steps_per_loop=10")
NOTHING_TRAINED = (
    "trainer: Interrupted (SIGINT) during start-up; nothing was trained.",
    "trainer: Interrupted (SIGINT) while parsing flags; nothing was trained.",
    "trainer: Interrupted (SIGINT) while importing plugins; nothing was trained.",
    "trainer: Interrupted (SIGINT) while building the trainer; nothing was trained.",
    "trainer: Interrupted (SIGINT) before the first step; nothing was trained.",
)


def console_script(directory: str) -> str:
    """The `tapeloop` script as pip writes it from setup.cfg's entry point: it imports the
    entry point's module, then calls its function."""
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO_DIR, "setup.cfg"))
    scripts = dict(
        line.replace(" ", "").split("=")
        for line in config["options.entry_points"]["console_scripts"].strip().splitlines()
    )
    module, function = scripts["tapeloop"].split(":")
    path = os.path.join(directory, "tapeloop")
    with open(path, "w") as f:
        f.write(
            "import re\nimport sys\n"
            f"from {module} import {function}\n"
            "if __name__ == '__main__':\n"
            "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
            f"    sys.exit({function}())\n"
        )
    return path


def _sigint_by_default():
    """Children of a background job start with SIGINT ignored, and Python keeps it so."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Process:
    """A command line in the background, its stdout and stderr in files, and a moment to
    send it SIGINT: `when(process)` becomes true."""

    def __init__(self, test, name, command, when):
        out = test.create_tempdir(name).full_path
        self.model_dir = os.path.join(out, "run")
        self.when, self.signalled = when, False
        self.out_path, self.err_path = os.path.join(out, "out"), os.path.join(out, "err")
        with open(self.out_path, "w") as stdout, open(self.err_path, "w") as stderr:
            self.process = subprocess.Popen(
                [*command, *LONG_RUN, f"--model_dir={self.model_dir}"],
                cwd=REPO_DIR,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                     "PYTHONPATH": os.pathsep.join([REPO_DIR, FIXTURES_DIR])},
                stdout=stdout,
                stderr=stderr,
                preexec_fn=_sigint_by_default,
            )  # fmt: skip
        self.start = time.monotonic()
        test.addCleanup(self.kill)

    def seconds(self) -> float:
        return time.monotonic() - self.start

    def loading_tensorflow(self) -> bool:
        """Whether NumPy's or TensorFlow's libraries are loaded: tapeloop's own code runs
        (before it, Python's start-up: a Ctrl-C then is Python's to handle)."""
        try:
            with open(f"/proc/{self.process.pid}/maps") as f:
                maps = f.read()
        except OSError:
            return False
        return "/numpy/" in maps or "/tensorflow/" in maps

    def stderr(self) -> str:
        with open(self.err_path) as f:
            return f.read()

    def stdout(self) -> str:
        with open(self.out_path) as f:
            return f.read()

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def after(seconds: float):
    """`seconds` after the start, once the process is importing TensorFlow."""
    return lambda p: p.seconds() >= seconds and p.loading_tensorflow()


def after_line(text: str):
    return lambda p: text in p.stderr()


@absltest.skipUnless(os.path.exists("/proc/self/maps"), "needs Linux's /proc")
class CtrlCAtStartUpTest(CliTestCase):
    def test_sigint_at_any_moment_ends_with_one_line_and_130(self):
        """SIGINT 0.2, 1 and 3 s into `python -m trainer`, after the log line of the build
        (the penalty table), and 1 s into the `tapeloop` script: each ends with exit 130,
        one `trainer: Interrupted (SIGINT) ...` line last on stderr, no traceback, nothing
        on stdout; a checkpoint only where the line says so."""
        module = [sys.executable, "-m", "trainer"]
        script = [sys.executable, console_script(self.create_tempdir().full_path)]
        processes = {
            "at_0.2s": Process(self, "at_0.2s", module, after(0.2)),
            "at_1s": Process(self, "at_1s", module, after(1)),
            "at_3s": Process(self, "at_3s", module, after(3)),
            "after_build": Process(self, "after_build", module, after_line("penalty coverage:")),
            "script_at_1s": Process(self, "script_at_1s", script, after(1)),
        }
        deadline = time.monotonic() + TIMEOUT_S
        while not all(p.signalled for p in processes.values()):
            for p in processes.values():
                if not p.signalled and p.when(p):
                    p.process.send_signal(signal.SIGINT)
                    p.signalled = True
                ended = p.process.poll()
                self.assertTrue(p.signalled or ended is None, f"exited {ended}: {p.stderr()}")
            self.assertLess(time.monotonic(), deadline, "a moment never came")
            time.sleep(0.05)
        for name, p in processes.items():
            with self.subTest(name):
                try:
                    rc = p.process.wait(timeout=max(1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    rc = "timeout"
                stderr = p.stderr()
                self.assertEqual(rc, 130, stderr[-3000:])
                self.assertNotIn("Traceback", stderr)
                self.assertNotIn("KeyboardInterrupt", stderr)
                self.assertEqual(p.stdout(), "")
                lines = [line for line in stderr.splitlines() if line.startswith("trainer:")]
                self.assertLen(lines, 1, stderr[-3000:])
                self.assertEqual(last_line(stderr), lines[0])
                checkpoint = tf.train.latest_checkpoint(p.model_dir)
                if lines[0] in NOTHING_TRAINED:
                    self.assertIsNone(checkpoint)
                else:  # the loop saw it: it saved and stopped
                    self.assertEqual(name, "after_build", lines[0])
                    self.assertIsNotNone(checkpoint, lines[0])
                    step = checkpoint.rsplit("-", 1)[1]
                    self.assertEqual(
                        lines[0],
                        f"trainer: Interrupted (SIGINT): saved step {step} to {checkpoint}; "
                        "rerun to resume.",
                    )


# A Ctrl-C at each later stage: what raises KeyboardInterrupt there, and the line.
STAGES = [
    ("parsing_flags", "trainer.cli.main._parse_flags", "while parsing flags"),
    ("importing_plugins", "trainer.cli.registry.import_modules", "while importing plugins"),
    ("building_the_trainer", "trainer.cli.registry.get_task", "while building the trainer"),
    ("before_the_first_step", (Trainer, "build"), "before the first step"),
]


class CtrlCStagesTest(CliTestCase):
    @parameterized.named_parameters(STAGES)
    def test_ctrl_c_before_training_says_where_and_that_nothing_was_trained(self, target, where):
        model_dir = os.path.join(self.create_tempdir().full_path, "run")
        patch = mock.patch.object(*target) if isinstance(target, tuple) else mock.patch(target)
        with patch as interrupt:
            interrupt.side_effect = KeyboardInterrupt
            result = run_cli(
                "--import=cli_plugin", "--task=tiny_linear", f"--model_dir={model_dir}"
            )
        self.assertTrue(interrupt.called)
        self.assertEqual(result.returncode, 130, context(result))
        self.assertNotIn("Traceback", result.stderr, context(result))
        self.assertEqual(
            last_line(result.stderr), f"trainer: Interrupted (SIGINT) {where}; nothing was trained."
        )
        self.assertIsNone(tf.train.latest_checkpoint(model_dir))

    def test_ctrl_c_during_the_export_keeps_the_last_step_and_a_rerun_exports(self):
        """Interrupted while the SavedModel is written: the line names the saved step and
        that the export folder keeps its previous export (none here: the folder is written
        aside, then renamed); a rerun trains nothing, exports, and exits 0."""
        out = self.create_tempdir().full_path
        model_dir, export_dir = os.path.join(out, "run"), os.path.join(out, "export")
        flags = ("--import=cli_plugin", "--task=tiny_linear", f"--model_dir={model_dir}",
                 f"--export_dir={export_dir}")  # fmt: skip
        archive = type(keras.export.ExportArchive())
        with mock.patch.object(archive, "write_out", side_effect=KeyboardInterrupt):
            result = run_cli(*flags)
        self.assertEqual(result.returncode, 130, context(result))
        self.assertNotIn("Traceback", result.stderr, context(result))
        self.assertEqual(
            last_line(result.stderr),
            "trainer: Interrupted (SIGINT) after the last step, while exporting and writing "
            f"results; step 20 is saved in {model_dir}: rerun to export; `export_dir` "
            f"({export_dir}) keeps its previous export, if any.",
        )
        self.assertFalse(os.path.exists(os.path.join(export_dir, "saved_model.pb")))
        self.assertEqual([n for n in os.listdir(out) if n.startswith("export.")], [])
        self.assertEqual(tf.train.latest_checkpoint(model_dir), f"{model_dir}/ckpt-20")
        with open(os.path.join(model_dir, "results.json")) as f:  # written before the export
            self.assertEqual(json.load(f)["step"], 20)

        result = run_cli(*flags)
        self.assertEqual(result.returncode, 0, context(result))
        self.assertIn("Already at step 20 of 20: not training.", result.stderr)
        self.assertTrue(os.path.exists(os.path.join(export_dir, "saved_model.pb")))

    @parameterized.named_parameters(
        ("before_the_first_step", (controller, "start_from_chief"),
         "before the first step; nothing was trained."),
        ("after_training", (controller.Controller, "_write_results"),
         "after training; the run is complete."),
    )  # fmt: skip
    def test_a_ctrl_c_python_drops_still_ends_the_run(self, target, where):
        """A real SIGINT handled inside a `__del__` (TensorFlow runs many as its objects are
        collected): Python cannot raise its KeyboardInterrupt there and drops it, printing
        `Exception ignored`. The run still ends with 130 and the stage's line, not after
        training to the end with 0: before training where the loop would begin (the likely
        cause of a CI run in which a SIGINT right after the build went unseen and 100,000
        steps trained), at the end after it."""
        model_dir = os.path.join(self.create_tempdir().full_path, "run")

        class SignalledWhileCollected:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(100))  # bytecodes after it: the handler runs here, in `__del__`

        owner, name = target
        original, calls = getattr(owner, name), []

        def signalled(*args, **kwargs):
            calls.append(name)
            SignalledWhileCollected()  # collected at once
            return original(*args, **kwargs)

        with mock.patch.object(owner, name, signalled):
            result = run_cli(
                "--import=cli_plugin", "--task=tiny_linear", f"--model_dir={model_dir}"
            )
        self.assertTrue(calls)
        self.assertEqual(result.returncode, 130, context(result))
        for text in ("Traceback", "Exception ignored", "KeyboardInterrupt"):
            self.assertNotIn(text, result.stderr, context(result))
        self.assertEqual(
            last_line(result.stderr),
            f"trainer: Interrupted (SIGINT) {where}",
        )
        trained = name == "_write_results"
        self.assertEqual(tf.train.latest_checkpoint(model_dir) is not None, trained)


if __name__ == "__main__":
    absltest.main()
