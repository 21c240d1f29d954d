"""Sweep grids: several `--sweep` axes × seeds in one process, the step traced once; a trial
equals a standalone run; mean ± sd per point; HParams; the grid limit; diverged trials."""

import json
import math
import os
import shutil
import tempfile

import grid_plugin
import numpy as np
import tensorflow as tf
from cli_runner import context, run_cli
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from trainer import L2, ConfigError, DecoupledWeightDecay, TrainerOptions
from trainer.cli import main as cli_main
from trainer.cli.sweep import MAX_TRIALS, parse_sweep, point_rows, run_sweep
from trainer.inputs import InMemoryBatches

STRENGTHS, RATES, SEEDS = (0.0, 1e-3, 1e-2), (1e-3, 1e-2), (0, 1, 2)


def hparams_content(directory):
    """The HParams plugin's data in `directory`'s event files, parsed: {tag: HParamsPluginData}."""
    accumulator = event_accumulator.EventAccumulator(directory)
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(c) for tag, c in content.items()}


def trial_name(strength, rate, seed):
    return f"l2.scale={strength:g},learning_rate={rate:g},seed={seed}"


def grid_task(**options):
    defaults = {"train_steps": 8, "steps_per_loop": 8, "batch_size": 16, "learning_rate": 1e-2}
    return grid_plugin.GridMlp(TrainerOptions(**{**defaults, **options}), penalties=[L2(1e-3)])


class AcceptanceGridTest(tf.test.TestCase):
    """The issue's grid from the command line: 3 strengths × 2 learning rates × 3 seeds."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model_dir = tempfile.mkdtemp()
        cls.result = run_cli(
            "--import=grid_plugin",
            "--task=grid_mlp",
            "--penalty=l2(1e-3)",
            "--sweep=l2.scale=0,1e-3,1e-2",
            "--sweep=learning_rate=1e-3,1e-2",
            "--sweep_seeds=3",
            f"--model_dir={cls.model_dir}",
        )
        cls.trainer = cli_main._STAGE.trainer

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.model_dir, ignore_errors=True)
        super().tearDownClass()

    def setUp(self):
        self.assertEqual(self.result.returncode, 0, context(self.result))

    def evals(self):
        """{(strength, rate): [held-out loss per seed]}, from each trial's results.json."""
        losses = {}
        for strength in STRENGTHS:
            for rate in RATES:
                for seed in SEEDS:
                    path = os.path.join(self.model_dir, trial_name(strength, rate, seed))
                    with open(os.path.join(path, "results.json")) as f:
                        losses.setdefault((strength, rate), []).append(json.load(f)["eval"]["loss"])
        return losses

    def test_eighteen_trials_in_one_trace(self):
        folders = {d for d in os.listdir(self.model_dir) if "=" in d}
        expected = {trial_name(a, r, s) for a in STRENGTHS for r in RATES for s in SEEDS}
        self.assertEqual(folders, expected)
        self.assertEqual(self.trainer.train_loop.trace_counts()["step"], 1)
        losses = self.evals()
        # Every seed of a point trains differently (weights and data order).
        for values in losses.values():
            self.assertLen(set(values), 3)

    def test_table_gives_mean_and_sd_per_point_ranked(self):
        """Each row's mean ± sd (ddof=1) over the seeds, computed here in NumPy; ranked."""
        losses = self.evals()
        lines = self.result.stdout.strip().splitlines()
        rows = [line.split() for line in lines if line.split()[0].isdigit()]
        self.assertLen(rows, 6, self.result.stdout)
        self.assertEqual([int(r[0]) for r in rows], list(range(1, 7)))
        means = []
        for row in rows:
            strength, rate, mean, plus_minus, sd = row[1:6]
            self.assertEqual(plus_minus, "±")
            values = np.array(losses[(float(strength), float(rate))])
            self.assertAllClose(float(mean), values.mean(), rtol=1e-5)  # printed to 6 digits
            self.assertAllClose(float(sd), values.std(ddof=1), rtol=1e-1)  # printed to 2 digits
            means.append(values.mean())
        self.assertEqual(means, sorted(means))  # ranked, the lowest held-out loss first
        self.assertTrue(lines[1].endswith("<- best"), self.result.stdout)
        self.assertIn("; 0 of 18 runs diverged, left out.", self.result.stdout)

    def test_hparams_name_both_axes_and_the_seed(self):
        config = hparams_content(self.model_dir)["_hparams_/experiment"].experiment
        self.assertCountEqual(
            [h.name for h in config.hparam_infos], ["l2.scale", "learning_rate", "seed"]
        )
        for strength in STRENGTHS:
            for rate in RATES:
                for seed in SEEDS:
                    name = trial_name(strength, rate, seed)
                    data = hparams_content(os.path.join(self.model_dir, name))
                    start = data["_hparams_/session_start_info"].session_start_info
                    hparams = {k: v.number_value for k, v in start.hparams.items()}
                    self.assertAllClose(
                        hparams, {"l2.scale": strength, "learning_rate": rate, "seed": seed}
                    )
                    self.assertEqual(start.group_name, name)


class TrialTest(tf.test.TestCase):
    def test_a_trial_equals_a_standalone_run(self):
        """The last trial (strength 1e-2, rate 5e-2, seed 4), after 3 others, ends with the
        weights of a fresh run at those values and `--seed=4`; decoupled decay with
        `coupling='schedule'` reads η_t = lr_t / lr_0, which the rate's sweep must keep at 1."""
        options = {"seed": 3, "train_steps": 10}  # 4 steps per epoch: 3 epochs' orders
        penalties = lambda scale: [L2(scale), DecoupledWeightDecay(0.05, coupling="schedule")]  # noqa: E731
        task = grid_task(**options)
        task.penalties = penalties(1e-3)
        specs = [parse_sweep("l2.scale=0,1e-2"), parse_sweep("learning_rate=5e-2")]
        results, _ = run_sweep(task, specs, seeds=2)
        self.assertEqual(task.train_loop.trace_counts()["step"], 1)
        self.assertEqual([r["seed"] for r in results], [3, 4] * 2)
        last = results[-1]
        self.assertEqual(last["point"], {"l2.scale": 1e-2, "learning_rate": 5e-2})
        fresh = grid_task(**{**options, "seed": 4, "learning_rate": 5e-2})
        fresh.penalties = penalties(1e-2)
        fresh_result = fresh.train()
        for got, want in zip(task.model.get_weights(), fresh.model.get_weights(), strict=True):
            self.assertAllClose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
        self.assertAllClose(last["eval"]["loss"], fresh_result.eval["loss"], rtol=1e-6)

    def test_the_data_seed_is_a_variable(self):
        """Assigning `seed` gives a fresh `InMemoryBatches(seed)`'s batches, traced once, with
        the cached order (graph) and without (XLA)."""
        x = np.arange(40, dtype=np.float32)
        batches = InMemoryBatches(x, batch_size=8, seed=0)
        cached = tf.function(lambda step: batches.batch(step))
        compiled = tf.function(lambda step: batches.batch(step, cached=False), jit_compile=True)
        for seed in (0, 5, 2**32 - 1):
            batches.seed = seed
            fresh = InMemoryBatches(x, batch_size=8, seed=seed)
            for step in (0, 4, 6, 1):  # epochs 0 and 1, then 0 again
                want = fresh.batch(tf.constant(step))
                self.assertAllEqual(cached(tf.constant(step)), want)
                self.assertAllEqual(compiled(tf.constant(step)), want)
        self.assertEqual(cached.experimental_get_tracing_count(), 1)
        self.assertEqual(compiled.experimental_get_tracing_count(), 1)
        self.assertNotAllEqual(
            InMemoryBatches(x, 8, seed=0).batch(0), InMemoryBatches(x, 8, seed=5).batch(0)
        )


class CompiledSweepTest(tf.test.TestCase):
    def test_an_xla_loop_is_compiled_once_for_every_run(self):
        """The default task's in-memory loop under XLA, swept over 2 × 2 trials with a
        model_dir: each run writes its own TensorBoard rows, while the compiled steps are
        traced (and compiled) once; only the outer loop, which holds the writer, is made
        again per run."""
        from tasks.synthetic import SyntheticRegression

        model_dir = self.create_tempdir().full_path
        options = {"train_steps": 20, "steps_per_loop": 10, "summary_every": 10,
                   "model_dir": model_dir}  # fmt: skip
        task = SyntheticRegression(SyntheticRegression.make_options(**options), penalties=[L2(0.0)])
        run_sweep(task, parse_sweep("l2.scale=0,1e-2"), seeds=2)
        self.assertTrue(task.train_loop.xla)
        self.assertEqual(task.train_loop.trace_counts()["steps"], 1)
        self.assertEqual(task.train_loop.trace_counts()["step"], 1)
        for value in ("0", "0.01"):
            for seed in (0, 1):
                run_dir = os.path.join(model_dir, f"l2.scale={value},seed={seed}")
                accumulator = event_accumulator.EventAccumulator(run_dir)
                accumulator.Reload()
                steps = [e.step for e in accumulator.Tensors("loss/total")]
                self.assertEqual(steps, [10, 20], run_dir)


class LimitsTest(tf.test.TestCase):
    def test_a_grid_above_the_limit_is_refused_before_training(self):
        model_dir = os.path.join(self.create_tempdir().full_path, "runs")
        strengths = ",".join(f"{i}e-4" for i in range(11))
        rates = ",".join(f"{i + 1}e-3" for i in range(10))
        result = run_cli(
            "--import=grid_plugin",
            "--task=grid_mlp",
            "--penalty=l2(1e-3)",
            f"--sweep=l2.scale={strengths}",
            f"--sweep=learning_rate={rates}",
            "--sweep_seeds=10",
            f"--model_dir={model_dir}",
        )
        self.assertEqual(result.returncode, 2, context(result))
        self.assertEqual(
            result.stderr.strip().splitlines()[-1],
            "trainer: error: --sweep: the grid has 1100 trials (11 (l2.scale) × 10 "
            f"(learning_rate) × 10 seeds), more than the limit of {MAX_TRIALS}; sweep fewer "
            "values or seeds.",
        )
        self.assertFalse(os.path.exists(model_dir))

    def test_bad_grids_are_refused_before_training(self):
        task = grid_task()
        strengths, rates = parse_sweep("l2.scale=0,1e-3,1e-2"), parse_sweep("learning_rate=1,2")
        cases = (
            (([strengths, rates], 3, 17), "the grid has 18 trials .* limit of 17"),
            (([strengths, strengths], None, MAX_TRIALS), "the axis l2.scale is given twice"),
            (([strengths], 0, MAX_TRIALS), r"--sweep_seeds \(0\) must be a positive integer"),
            (([parse_sweep("learning_rate=-1")], None, MAX_TRIALS), "value -1.0 of learning_rate"),
        )
        for (specs, seeds, limit), message in cases:
            with self.assertRaisesRegex(ConfigError, message):
                run_sweep(task, specs, seeds, max_trials=limit)
        self.assertEqual(task.step, 0)
        scheduled = grid_task(lr_schedule="cosine")
        with self.assertRaisesRegex(ConfigError, "follows a schedule"):
            run_sweep(scheduled, [rates])
        with self.assertRaisesRegex(ConfigError, "expected PENALTY.STRENGTH"):
            parse_sweep("momentum=0.9")

    def test_a_diverged_trial_is_shown_and_counted(self):
        task = grid_task(optimizer="sgd")
        results, table = run_sweep(task, [parse_sweep("learning_rate=1e-2,1e3")], seeds=2)
        self.assertEqual([bool(r["diverged"]) for r in results], [False, False, True, True])
        lines = table.splitlines()
        self.assertEqual(lines[1].split()[:2], ["1", "0.01"])
        self.assertTrue(lines[1].endswith("<- best"), table)
        self.assertEqual(lines[2].split()[1:3], ["1000", "-"], table)
        self.assertTrue(lines[2].endswith("2/2 diverged"), table)
        self.assertIn("; 2 of 4 runs diverged, left out.", table)


class PointRowsTest(tf.test.TestCase):
    def test_within_one_sd_of_the_best_by_hand(self):
        """Marks by |mean − best mean| ≤ the best point's sample sd, computed here by hand."""
        losses = {
            "a": [1.0, 1.2, 1.4],  # mean 1.2, sd 0.2: the best
            "b": [1.0, 1.45, 1.9],  # mean 1.45: 0.25 > 0.2 (within its own sd 0.45: not used)
            "c": [1.33, 1.38, 1.43],  # mean 1.38: 0.18 ≤ 0.2 (but > 0.163, the ddof=0 sd)
            "d": [1.1, math.nan, 5.0],  # one diverged; mean 3.05 of the two others
        }
        gaps = {"a": [0.1, 0.2, 0.3]}
        results = []
        for point, values in losses.items():
            for i, value in enumerate(values):
                diverged = "loss is nan" if math.isnan(value) else None
                evaluation = {} if diverged else {"loss": value}
                result = {"point": {"p": point}, "seed": i, "diverged": diverged,
                          "export_dir": None, "eval": evaluation}  # fmt: skip
                if point in gaps:
                    result["gap"] = {"loss": gaps[point][i]}
                results.append(result)
        rows = point_rows(results, "loss", "min")
        self.assertEqual([r.point["p"] for r in rows], ["a", "c", "b", "d"])
        self.assertEqual([r.mark for r in rows], ["best", "within 1 sd", "", ""])
        self.assertEqual([r.diverged for r in rows], [0, 0, 0, 1])
        best_sd = np.std(losses["a"], ddof=1)
        for row in rows:
            kept = [v for v in losses[row.point["p"]] if not math.isnan(v)]
            self.assertAllClose(row.mean, np.mean(kept), rtol=1e-6)
            self.assertAllClose(row.sd, np.std(kept, ddof=1), rtol=1e-6)
            near = abs(np.mean(kept) - np.mean(losses["a"])) <= best_sd
            self.assertEqual(row.mark != "", near)
        self.assertAllClose([rows[0].gap_mean, rows[0].gap_sd], [0.2, 0.1], rtol=1e-6)
        self.assertTrue(math.isnan(rows[1].gap_mean))  # no gap in the results: "-"
        maxed = point_rows(results, "loss", "max")
        self.assertEqual([r.point["p"] for r in maxed], ["d", "b", "c", "a"])
        self.assertEqual(maxed[0].mark, "best")
