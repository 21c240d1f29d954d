"""The command line: usage errors, the default run, user plugins, `--help`.

Every bad input must end with exit status 2 and one line on stderr, `trainer: error: ...`,
that names the bad value, never a traceback. The CLI runs in this process (`run_cli`), as in a
fresh one; only the default run and the console script, where the process is what is tested,
start `python -m trainer` and `tapeloop` (each imports TensorFlow, a few seconds).
"""

import dataclasses
import json
import math
import os
import re
import shutil
import sys

import cli_plugin
import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized
from cli_runner import CliTestCase, context, last_line, run_cli, run_cli_process

from trainer.options import SECTIONS, TrainerOptions, option_help, option_sections

COMMAND_FLAGS = ("task", "penalty", "param_group", "import", "describe", "sweep", "sweep_seeds")


def tapeloop_script() -> str | None:
    """The `tapeloop` console script next to this interpreter, else the one on PATH."""
    script = os.path.join(os.path.dirname(sys.executable), "tapeloop")
    return script if os.access(script, os.X_OK) else shutil.which("tapeloop")


# (name, flags, fragments of the error line). `--train_steps=1` is passed first, so that a
# run that got past the check would be short; a later `--train_steps` overrides it.
USAGE_ERRORS = [
    ("unknown_task", ["--task=nope"], ["'nope'", "synthetic"]),
    ("unknown_penalty", ["--penalty=nope(1)"], ["'nope'", "l2", "selective_l2"]),
    ("unclosed_paren", ["--penalty=l2(1e-4"], ["Malformed", "'l2(1e-4'"]),
    ("not_a_call", ["--penalty=1+2"], ["Malformed", "'1+2'"]),
    ("wrong_argument_name", ["--penalty=l2(scal=1)"], ["'l2(scal=1)'", "'scal'"]),
    ("non_literal_argument", ["--penalty=l2(x)"], ["'l2(x)'", "'x'", "not a literal"]),
    ("negative_scale", ["--penalty=l2(-1)"], ["'l2(-1)'", "`scale` (-1)"]),
    (
        "negative_rate",
        ["--penalty=decoupled_weight_decay(-0.1)"],
        ["decoupled_weight_decay(-0.1)", "`rate` (-0.1)"],
    ),
    (
        "invalid_regex",
        ["--penalty=selective_l2(1e-4, include='(')"],
        ["`include` ('(')", "not a valid regex"],
    ),
    (
        "regex_matches_nothing",
        ["--penalty=selective_l2(1e-4, include='kernal')"],
        ["include='kernal'", "matches no variable path", "dense/kernel'"],
    ),
    ("zero_train_steps", ["--train_steps=0"], ["`train_steps` (0)", "integer from 1"]),
    ("negative_batch_size", ["--batch_size=-3"], ["`batch_size` (-3)", "integer from 1"]),
    ("zero_steps_per_loop", ["--steps_per_loop=0"], ["`steps_per_loop` (0)", "integer from 1"]),
    ("learning_rate_not_a_number", ["--learning_rate=abc"], ["--learning_rate", "'abc'"]),
    ("unknown_flag", ["--no_such_flag=1"], ["'no_such_flag'"]),
    ("positional_argument", ["stray"], ["'stray'"]),
    ("missing_import", ["--import=no_such_module_xyz"], ["'no_such_module_xyz'", "no such module"]),
    ("relative_import", ["--import=.foo"], ["'.foo'", "not a module name"]),
    ("steps_overflow_int32", ["--train_steps=3000000000"], ["`train_steps` (3000000000)"]),
    ("negative_seed", ["--seed=-1"], ["`seed` (-1)"]),
    (
        "accumulate_steps_not_dividing_batch",
        ["--accumulate_steps=3", "--batch_size=64"],
        ["`accumulate_steps` (3)", "`batch_size` (64)"],
    ),
    ("zero_accumulate_steps", ["--accumulate_steps=0"], ["`accumulate_steps` (0)"]),
    ("ema_decay_above_one", ["--ema_decay=1.5"], ["`ema_decay` (1.5)", "below 1"]),
    ("warmup_above_train_steps", ["--warmup_steps=5"], ["`warmup_steps` (5)", "from 0 to 1"]),
    ("unknown_lr_schedule", ["--lr_schedule=bogus"], ["--lr_schedule", "bogus", "cosine"]),
    ("negative_clip_global_norm", ["--clip_global_norm=-1"], ["`clip_global_norm` (-1"]),
    ("unhashable_literal", ["--penalty=l2({[]: 1})"], ["'l2({[]: 1})'", "not a literal"]),
    ("bad_penalty_name", ["--penalty=l2(name=1)"], ["`name` (1)"]),
    (
        "adamw_and_decoupled_decay",
        ["--optimizer=adamw", "--penalty=decoupled_weight_decay(1e-2)"],
        ["decayed twice", "DecoupledWeightDecay(rate=0.01)", "AdamW(weight_decay=0.004)"],
    ),
    (
        "import_registers_a_taken_name",
        ["--import=clash_plugin"],
        ["penalty name 'l1' is already registered", "clash_plugin.MyL1"],
    ),
    (
        "plugin_penalty_rejects_value",
        ["--import=cli_plugin", "--task=tiny_linear", "--penalty=l1_test(-1)"],
        ["'l1_test(-1)'", "`scale` (-1)"],
    ),
]


class UsageErrorTest(CliTestCase):
    @parameterized.named_parameters(USAGE_ERRORS)
    def test_usage_error(self, flags, fragments):
        """A bad flag or spec: exit 2, no traceback, one error line naming the bad value."""
        self.assert_usage_error(run_cli("--train_steps=1", *flags), *fragments)

    def test_unwritable_model_dir(self):
        """--model_dir under a regular file: exit 2 and an error line naming the path."""
        regular_file = self.create_tempfile("not_a_dir").full_path
        model_dir = os.path.join(regular_file, "sub")
        result = run_cli("--train_steps=1", f"--model_dir={model_dir}")
        self.assert_usage_error(result, f"`model_dir` ({model_dir!r})", "not writable")

    def test_console_script_reports_usage_error(self):
        """The installed `tapeloop` console script exits 2 with the same one-line error."""
        script = tapeloop_script()
        self.assertIsNotNone(script, "the `tapeloop` console script is not installed")
        result = run_cli_process("--task=nope", "--train_steps=1", command=[script])
        self.assert_usage_error(result, "'nope'", "synthetic")


class RunTest(CliTestCase):
    def test_no_flags_trains_the_default_task(self):
        """`python -m trainer` alone, as a process (README's set-up command): it trains
        `synthetic`, exits 0, prints losses and eval."""
        result = run_cli_process()
        self.assertEqual(result.returncode, 0, context(result))
        self.assertNotIn("Traceback", result.stderr, context(result))
        self.assertIn("synthetic: 2000 steps", result.stdout, context(result))
        self.assertRegex(
            result.stdout, r"train \(last loop\): loss=\S+ data_loss=\S+", context(result)
        )
        self.assertRegex(result.stdout, r"(?m)^\s*eval: loss=\d", context(result))

    def test_every_technique_at_once(self):
        """Schedule + warmup, clipping, accumulation, EMA, L2 and decoupled decay: exit 0,
        the techniques in the start-up table, an export and results.json."""
        model_dir = self.create_tempdir("model").full_path
        export_dir = os.path.join(self.create_tempdir("export").full_path, "saved")
        result = run_cli(
            "--lr_schedule=cosine", "--warmup_steps=50", "--train_steps=400",
            "--learning_rate=1e-2", "--clip_global_norm=1.0", "--accumulate_steps=2",
            "--ema_decay=0.99", "--penalty=selective_l2(1e-3, exclude='bias')",
            "--penalty=decoupled_weight_decay(1e-2)", f"--model_dir={model_dir}",
            f"--export_dir={export_dir}",
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, context(result))
        self.assertIn(
            "techniques: lr_schedule=cosine", result.stderr + result.stdout, context(result)
        )
        self.assertTrue(os.path.exists(os.path.join(export_dir, "saved_model.pb")))
        self.assertTrue(os.path.exists(os.path.join(model_dir, "results.json")))

    def test_plugin_task_and_penalty(self):
        """A user's --import'ed task and penalty train; results.json holds the breakdown."""
        model_dir = self.create_tempdir("model").full_path
        result = run_cli(
            "--import=cli_plugin",
            "--task=tiny_linear",
            "--penalty=l1_test(0.01)",
            "--train_steps=20",
            f"--model_dir={model_dir}",
        )
        self.assertEqual(result.returncode, 0, context(result))
        self.assertNotIn("Traceback", result.stderr, context(result))
        self.assertIn("tiny_linear: 20 steps", result.stdout, context(result))
        self.assertIn("penalty/l1_test=", result.stdout, context(result))
        self.assertIn("penalty/l1_test=", result.stderr, context(result))  # the progress lines
        self.assertIn("L1(scale=0.01)", result.stderr, context(result))  # the penalty table

        with open(os.path.join(model_dir, "results.json")) as f:
            results = json.load(f)
        self.assertEqual(results["step"], 20)
        train = results["train"]
        self.assertEqual(list(train), ["loss", "data_loss", "penalty/l1_test"])
        self.assertGreater(train["penalty/l1_test"], 0.0)
        # Means over the last loop: the total is the data loss plus the penalty term.
        self.assertTrue(
            math.isclose(
                train["loss"], train["data_loss"] + train["penalty/l1_test"], rel_tol=1e-5
            ),
            train,
        )
        self.assertTrue(math.isfinite(results["eval"]["loss"]), results["eval"])

    def test_plugin_penalty_strength_sweeps(self):
        """`self.scale` in a plugin's compiled `loss()` follows a sweep without retracing."""
        result = run_cli(
            "--import=cli_plugin",
            "--task=tiny_linear",
            "--penalty=l1_test(0.01)",
            "--sweep=l1_test.scale=0,1e-2",
            "--train_steps=20",
        )
        self.assertEqual(result.returncode, 0, context(result))
        rows = result.stdout.strip().splitlines()[-2:]
        self.assertEqual([r.split()[0] for r in rows], ["0", "0.01"], context(result))
        losses = [float(r.split()[1]) for r in rows]
        self.assertNotEqual(losses[0], losses[1], context(result))

    def test_sweep_exports_one_folder_per_run(self):
        """`--sweep` with `--export_dir`: one SavedModel per value, in the run's folder name,
        each giving what the run's last checkpoint gives in NumPy (the two differ); the
        table's last line names the best run's folder."""
        out = self.create_tempdir().full_path
        model_dir, export_dir = os.path.join(out, "runs"), os.path.join(out, "export")
        result = run_cli(
            "--import=cli_plugin",
            "--task=tiny_linear",
            "--penalty=l1_test(0.01)",
            "--sweep=l1_test.scale=0,1",
            f"--model_dir={model_dir}",
            f"--export_dir={export_dir}",
        )
        self.assertEqual(result.returncode, 0, context(result))
        runs = ["l1_test.scale=0", "l1_test.scale=1"]
        self.assertCountEqual(os.listdir(export_dir), runs)
        x = cli_plugin.make_data(seed=2)[0]
        outputs = []
        for run in runs:
            exported = tf.saved_model.load(os.path.join(export_dir, run))
            outputs.append(exported.serve(x).numpy())
            reader = tf.train.load_checkpoint(os.path.join(model_dir, run))
            weights = {
                reader.get_tensor(key).shape: reader.get_tensor(key)
                for key in reader.get_variable_to_shape_map()
                if key.startswith("model_variables/")
            }
            kernel, bias = weights[(cli_plugin.FEATURES, 1)], weights[(1,)]
            np.testing.assert_allclose(outputs[-1], x @ kernel + bias, rtol=1e-5, atol=1e-6)
        self.assertGreater(np.abs(outputs[0] - outputs[1]).max(), 0.1)
        lines = result.stdout.strip().splitlines()
        best = [line.split()[0] for line in lines if line.endswith("<- best")]
        self.assertLen(best, 1, result.stdout)
        self.assertEqual(
            lines[-1],
            f"best: l1_test.scale={best[0]}, exported to {export_dir}/l1_test.scale={best[0]}",
        )

    def test_diverging_run_exits_1_without_traceback(self):
        """A learning rate that blows the loss up: exit 1 and a one-line `trainer:` message."""
        result = run_cli("--import=cli_plugin", "--task=tiny_linear", "--learning_rate=1e3")
        self.assertEqual(result.returncode, 1, context(result))
        self.assertNotIn("Traceback", result.stderr, context(result))
        self.assertStartsWith(last_line(result.stderr), "trainer: Non-finite loss", context(result))


class HelpTest(CliTestCase):
    def test_help_lists_tapeloops_flags_by_section(self):
        """`--help` (and `-h`): exit 0, on stdout a usage line, examples, then every option
        flag under its section, in field order, with its help; absl's flags are not there."""
        for flag in ("--help", "-h", "--helpshort"):
            with self.subTest(flag=flag):
                result = run_cli("--train_steps=0", flag)  # help wins over a bad value
                self.assertEqual(result.returncode, 0, context(result))
                self.assertEqual(result.stderr, "", context(result))
                self.assertStartsWith(result.stdout, "usage: python -m trainer")
                self.assertIn("examples:\n  python -m trainer --task=synthetic", result.stdout)
                headings = [line[:-1] for line in result.stdout.splitlines()
                            if line.endswith(":") and not line.startswith(" ")]  # fmt: skip
                self.assertEqual(headings, ["examples", "command", *SECTIONS], result.stdout)
                for name in ("verbosity", "logtostderr", "helpfull", "only_check_args"):
                    self.assertNotIn(f"--{name}:", result.stdout)
        sections, heading = {}, None
        for line in result.stdout.splitlines():
            if line.endswith(":") and not line.startswith(" "):
                heading = line[:-1]
            elif heading:
                sections[heading] = sections.get(heading, "") + " " + line.strip()
        for section, names in [*option_sections().items(), ("command", COMMAND_FLAGS)]:
            flagged = re.findall(r"--(?:\[no\])?(\w+): ", sections[section])
            self.assertEqual(flagged, list(names), section)
            for name in names:
                if name in option_help():
                    self.assertIn(" ".join(option_help()[name].split()), sections[section])

    def test_helpfull_lists_every_flag(self):
        """`--helpfull` keeps absl's listing: one flag per TrainerOptions field, its help
        from the field's metadata, and absl's own flags."""
        result = run_cli("--helpfull")
        docs = option_help()
        for field in dataclasses.fields(TrainerOptions):
            self.assertRegex(result.stdout, rf"--(\[no\])?{field.name}:", field.name)
            first_words = " ".join(docs[field.name].split()[:4])
            self.assertIn(first_words, " ".join(result.stdout.split()), field.name)
        self.assertIn("--verbosity:", result.stdout)


if __name__ == "__main__":
    absltest.main()
