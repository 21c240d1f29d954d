"""Seeing it: TensorBoard tags read from event files, sweeps with HParams, progress, --describe."""

import glob
import io
import os

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from array_task import ArrayTask, mse, regression_data
from cli_runner import run_cli
from tensorboard.backend.event_processing import event_accumulator

from trainer import L2, ConfigError, DecoupledWeightDecay, SelectiveL2, TrainerOptions
from trainer.cli.sweep import parse_sweep, run_sweep
from trainer.run.progress import Progress


def read_events(directory):
    """{tag: [(step, value)]} for scalars, and {tag: text} for texts, from `directory`'s files."""
    scalars, texts, plugins = {}, {}, set()
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                plugins.add(value.metadata.plugin_data.plugin_name)
                tensor = tf.make_ndarray(value.tensor)
                if value.metadata.plugin_data.plugin_name == "text":
                    texts[value.tag] = tensor.item().decode()
                elif value.metadata.plugin_data.plugin_name == "scalars":
                    scalars.setdefault(value.tag, []).append((event.step, float(tensor)))
    return scalars, texts, plugins


def make_task(model_dir=None, **options):
    x, y = regression_data(n=64)
    defaults = {"batch_size": 16, "train_steps": 20, "steps_per_loop": 10, "summary_every": 5,
                "learning_rate": 0.01, "model_dir": model_dir}  # fmt: skip
    return ArrayTask(x, y, TrainerOptions(**{**defaults, **options}),
                     penalties=[L2(1e-2), DecoupledWeightDecay(0.1)])  # fmt: skip


class SummariesTest(tf.test.TestCase):
    def test_tags_and_values(self):
        """Every tag, every 5 steps, clean names; values checked against the run and NumPy."""
        model_dir = self.create_tempdir().full_path
        task = make_task(model_dir)
        result = task.train()
        scalars, texts, _ = read_events(model_dir)
        expected = {"loss/total", "loss/data", "loss/penalty/l2", "learning_rate",
                    "decay/decoupled_weight_decay", "norm/l2", "norm/decoupled_weight_decay",
                    "steps_per_sec", "eval/loss"}  # fmt: skip
        self.assertEqual(set(scalars), expected)
        self.assertFalse([t for t in [*scalars, *texts] if "while" in t])
        for tag in ("loss/total", "learning_rate", "norm/l2"):
            self.assertEqual([s for s, _ in scalars[tag]], [5, 10, 15, 20], tag)
        self.assertEqual([s for s, _ in scalars["steps_per_sec"]], [10, 20])
        total, data, l2 = (dict(scalars[t]) for t in ("loss/total", "loss/data", "loss/penalty/l2"))
        for step in total:
            self.assertAllClose(total[step], data[step] + l2[step], rtol=1e-6)
        self.assertAllClose(dict(scalars["learning_rate"])[20], 0.01)
        self.assertAllClose(dict(scalars["decay/decoupled_weight_decay"])[20], 0.01 * 0.1)
        weights = task.model.get_weights()
        self.assertAllClose(dict(scalars["norm/l2"])[20],
                            np.sqrt(sum(np.sum(w.astype(np.float64) ** 2) for w in weights)),
                            rtol=1e-5)  # fmt: skip
        kernels = [w for w in weights if w.ndim >= 2]
        self.assertAllClose(dict(scalars["norm/decoupled_weight_decay"])[20],
                            np.sqrt(sum(np.sum(w.astype(np.float64) ** 2) for w in kernels)),
                            rtol=1e-5)  # fmt: skip
        self.assertAllClose(dict(scalars["eval/loss"])[20], result.eval["loss"], rtol=1e-6)
        self.assertRegex(texts["penalties"], r"net/hidden/bias +\(3,\) +3  l2\n")
        self.assertIn("covered by no penalty: 0 variables", texts["penalties"])

    def test_no_model_dir_or_summary_every_zero_writes_nothing(self):
        model_dir = self.create_tempdir().full_path
        make_task(model_dir, summary_every=0).train()
        scalars, _, _ = read_events(model_dir)
        self.assertEqual(scalars, {})


class SweepTest(tf.test.TestCase):
    def test_three_values_one_trace_hparams_and_table(self):
        """3 runs of one Trainer: the step traced once, HParams per run, the best marked."""
        model_dir = self.create_tempdir().full_path
        x, y = regression_data(n=64)
        options = TrainerOptions(batch_size=16, train_steps=30, steps_per_loop=10,
                                 learning_rate=0.05, model_dir=model_dir,
                                 summary_every=10)  # fmt: skip
        task = ArrayTask(x, y, options, penalties=[SelectiveL2(1e-3, exclude="bias")])
        spec = parse_sweep("selective_l2.scale=0,0.01,1")
        results, table = run_sweep(task, spec)
        self.assertEqual(task.train_loop.trace_counts()["step"], 1)
        self.assertEqual([r["value"] for r in results], [0.0, 0.01, 1.0])
        losses = [r["eval"]["loss"] for r in results]
        self.assertLen(set(losses), 3)
        # Each run starts from the same state: the middle run equals a fresh one at λ=0.01.
        fresh = ArrayTask(x, y, TrainerOptions(batch_size=16, train_steps=30, steps_per_loop=10,
                                               learning_rate=0.05),
                          penalties=[SelectiveL2(0.01, exclude="bias")])  # fmt: skip
        self.assertAllClose(fresh.train().eval["loss"], losses[1], rtol=1e-5)
        lines = table.splitlines()
        self.assertIn("selective_l2.scale  held-out loss (min is best)", lines[0])
        best = int(np.argmin(losses))
        self.assertTrue(lines[1 + best].endswith("<- best"))
        self.assertEqual(sum(line.endswith("<- best") for line in lines), 1)
        for value in ("0", "0.01", "1"):
            run_dir = os.path.join(model_dir, f"selective_l2.scale={value}")
            scalars, _, plugins = read_events(run_dir)
            self.assertIn("hparams", plugins)
            self.assertIn("loss/penalty/selective_l2", scalars)
            accumulator = event_accumulator.EventAccumulator(run_dir)
            accumulator.Reload()
            hparams = accumulator.PluginTagToContent("hparams")
            self.assertIn("_hparams_/session_start_info", hparams)
            self.assertIn(b"selective_l2.scale", hparams["_hparams_/session_start_info"])
        _, _, plugins = read_events(model_dir)
        self.assertIn("hparams", plugins)

    def test_bad_sweeps(self):
        task = make_task()
        cases = (("l2.scale", "expected PENALTY.STRENGTH"),
                 ("l2.scale=a,b", "must be numbers"),
                 ("l3.scale=1", "penalties are l2, decoupled_weight_decay"),
                 ("l2.rate=1", r"'rate' is not a strength of L2\(scale=0.01\)"))  # fmt: skip
        for spec, message in cases:
            with self.assertRaisesRegex(ConfigError, message):
                run_sweep(task, parse_sweep(spec))


class ProgressTest(parameterized.TestCase):
    def test_terminal_gets_one_live_line(self):
        class Terminal(io.StringIO):
            def isatty(self):
                return True

        stream = Terminal()
        progress = Progress(100, stream)
        progress.update(50, 25.0, {"loss": 0.5, "data_loss": 0.4})
        progress.update(60, 20.0, {"loss": 0.4, "data_loss": 0.3})
        progress.close()
        text = stream.getvalue()
        self.assertEqual(text.count("\r"), 2)
        self.assertIn("step 60/100  20.0 steps/s  ETA 0:02  loss=0.4 data_loss=0.3", text)
        self.assertTrue(text.endswith("\n"))

    def test_non_terminal_gets_log_lines(self):
        stream = io.StringIO()
        with self.assertLogs(logger="absl", level="INFO") as logs:
            Progress(100, stream).update(40, 10.0, {"loss": 1.0})
        self.assertEqual(stream.getvalue(), "")
        self.assertIn("step 40/100  10.0 steps/s  ETA 0:06  loss=1", "\n".join(logs.output))


class DescribeCliTest(tf.test.TestCase):
    def test_describe_shows_uncovered_biases_and_norms(self):
        """`--describe` on a model with biases and a LayerNorm: no training, a full table."""
        model_dir = self.create_tempdir().full_path
        done = run_cli(
            "--import=cli_plugin",
            "--task=tiny_norm",
            "--describe",
            "--penalty=decoupled_weight_decay(0.01)",
            "--penalty=selective_l2(1e-4, exclude='bias')",
            f"--model_dir={model_dir}",
        )
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        lines = done.stdout.splitlines()
        rows = {line.split()[0]: line for line in lines[1:] if line.startswith("tiny/")}
        self.assertRegex(rows["tiny/hidden/kernel"],
                         r"\(3, 8\) +24  decoupled_weight_decay, selective_l2$")  # fmt: skip
        self.assertRegex(rows["tiny/hidden/bias"], r"\(8,\) +8  -- none --$")
        self.assertRegex(rows["tiny/norm/gamma"], r"\(8,\) +8  selective_l2$")
        self.assertRegex(rows["tiny/norm/beta"], r"\(8,\) +8  selective_l2$")
        self.assertIn("  covered by no penalty: 2 variables, 9 parameters", lines)
        self.assertNotIn("step ", done.stderr)  # nothing trained
        _, texts, _ = read_events(model_dir)
        self.assertIn("tiny/norm/gamma", texts["penalties"])


class ExamplePluginsCliTest(tf.test.TestCase):
    def test_l1_and_l2sp_from_the_cli(self):
        done = run_cli("--penalty=l1(1e-4)", "--penalty=l2sp(1e-2)", "--train_steps=200")
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        self.assertRegex(done.stdout, r"penalty/l1=[0-9.e-]+ penalty/l2sp=[0-9.e-]+")


class GradNormSummaryTest(tf.test.TestCase):
    def test_grad_norm_is_the_global_norm_before_clipping(self):
        """With `clip_global_norm`, `grad_norm` at step 1 is ‖∇(data loss + L2)‖ of the first
        batch at the initial weights (recomputed here), not the clipped norm."""
        model_dir = self.create_tempdir().full_path
        x, y = regression_data(n=64)
        task = ArrayTask(x, y, TrainerOptions(batch_size=16, train_steps=2, summary_every=1,
                                              clip_global_norm=0.1, model_dir=model_dir),
                         penalties=[L2(1e-2)])  # fmt: skip
        variables = task.model.trainable_variables
        features, labels = x[:16], y[:16]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(mse(labels, task.model(features, training=True)))
            loss += 1e-2 * tf.add_n([tf.reduce_sum(tf.square(v)) for v in variables])
        gradients = tape.gradient(loss, variables)
        expected = float(tf.linalg.global_norm(gradients))
        task.train()
        norms = dict(read_events(model_dir)[0]["grad_norm"])
        self.assertGreater(expected, 0.1)  # so clipping acts, and a clipped norm would show
        self.assertAllClose(norms[1], expected, rtol=1e-5)


if __name__ == "__main__":
    tf.test.main()
