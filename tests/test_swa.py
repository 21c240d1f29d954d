"""Stochastic weight averaging (`trainer/step/swa.py`): the average against NumPy's mean of the
snapshots, the BatchNorm recalibration against a hand computation, what evaluation, export,
keep_best, resume, skipped mixed-precision steps and two replicas see. Each with a wrong
variant that must land elsewhere."""

import os

import keras
import numpy as np
import tensorflow as tf
from array_task import ArrayTask, regression_data, small_model

from trainer import ConfigError, TrainerOptions
from trainer.distribution import make_strategy
from trainer.step.swa import StochasticWeightAverage

STEPS, START, EVERY, BN_BATCHES = 20, 3, 4, 3
TAKEN = [s for s in range(1, STEPS + 1) if s > START and (s - START) % EVERY == 0]  # 7 11 15 19
COMMON = {"batch_size": 8, "learning_rate": 0.01}
SWA = {"swa_start": START, "swa_every": EVERY, "swa_bn_batches": BN_BATCHES}


def bn_model() -> keras.Model:
    """4 -> Dense(8, no bias) -> BatchNorm -> tanh -> Dense(2), with stable paths. The norm
    is synchronized so that two replicas train as one device does."""
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, use_bias=False, name="h"),
            keras.layers.BatchNormalization(synchronized=True, name="bn"),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(2, name="out"),
        ],
        name="net",
    )


def stage(task) -> StochasticWeightAverage:
    return task.built.chain.stage(StochasticWeightAverage)


def values(variables) -> list[np.ndarray]:
    return [v.numpy() for v in variables]


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(p) - np.asarray(q)))) for p, q in zip(a, b))


def checkpoint_model_variables(prefix: str) -> list[np.ndarray]:
    """The `model_variables` list of the checkpoint at `prefix`, in model order."""
    reader = tf.train.load_checkpoint(prefix)
    keys = [k for k in reader.get_variable_to_shape_map() if k.startswith("model_variables/")]
    return [reader.get_tensor(k) for k in sorted(keys, key=lambda k: int(k.split("/")[1]))]


class SwaTestCase(tf.test.TestCase):
    def assert_apart(self, wrong, reference, margin):
        diff = max_abs_diff(wrong, reference)
        print(f"MEASURED {self.id()}: wrong variant {diff:.2e} (must exceed {margin:g})")
        self.assertGreater(diff, margin)


class SnapshotsTest(SwaTestCase):
    """One task with a BatchNorm model trained step by step (the weights read after each)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.x, cls.y = regression_data(n=64)
        options = TrainerOptions(train_steps=STEPS, **COMMON, **SWA)
        cls.task = ArrayTask(cls.x, cls.y, options, model_fn=bn_model)
        iterator = iter(cls.task.train_dataset())
        cls.snapshots = {}
        for s in range(1, STEPS + 1):
            cls.task.train_loop.run(1, iterator)
            cls.snapshots[s] = values(cls.task.model.trainable_variables)

    def mean_of(self, steps):
        return [np.mean([self.snapshots[s][i] for s in steps], axis=0, dtype=np.float64)
                for i in range(len(self.snapshots[1]))]  # fmt: skip

    def test_average_equals_numpy_mean_of_the_snapshots_at_the_chosen_steps(self):
        """After steps 7, 11, 15 and 19 (s > 3, (s − 3) % 4 == 0): ≤ 1e-6 relative. Wrong
        variants: the steps off by one either way (s ≥ 3 counted from 3; 6, 10, 14, 18)."""
        self.assertEqual(TAKEN, [7, 11, 15, 19])
        self.assertEqual(int(stage(self.task).count.numpy()), len(TAKEN))
        averages = stage(self.task).averages
        got = [averages[v.path].numpy() for v in self.task.model.trainable_variables]
        for a, b in zip(got, self.mean_of(TAKEN), strict=True):
            self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)
        with self.task.evaluated_weights():
            for a, b in zip(values(self.task.model.trainable_variables), got, strict=True):
                self.assertAllEqual(a, b)
        self.assert_apart(got, self.mean_of([3, 7, 11, 15, 19]), 1e-5)
        self.assert_apart(got, self.mean_of([s - 1 for s in TAKEN]), 1e-5)

    def test_batchnorm_statistics_equal_numpy_over_the_first_training_batches(self):
        """Moving mean and variance ≡ the mean over the first 3 batches of the batch mean and
        biased variance of x·K̄ (K̄ the averaged kernel), ≤ 1e-6 relative. Wrong variants:
        not recalibrated (the raw statistics), all 8 batches of the data, the raw kernel."""
        model = self.task.model
        norm = model.get_layer("bn")
        raw_statistics = [norm.moving_mean.numpy(), norm.moving_variance.numpy()]
        raw_kernel = model.get_layer("h").kernel.numpy()
        with self.task.evaluated_weights():
            kernel = model.get_layer("h").kernel.numpy().astype(np.float64)
            got = [norm.moving_mean.numpy(), norm.moving_variance.numpy()]

        def by_hand(kernel, batches):
            outputs = [self.x[8 * k : 8 * k + 8].astype(np.float64) @ kernel for k in batches]
            return [np.mean([o.mean(axis=0) for o in outputs], axis=0),
                    np.mean([o.var(axis=0) for o in outputs], axis=0)]  # fmt: skip

        for a, b in zip(got, by_hand(kernel, range(BN_BATCHES)), strict=True):
            self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)
        self.assert_apart(got, raw_statistics, 1e-3)
        self.assert_apart(got, by_hand(kernel, range(8)), 1e-3)
        self.assert_apart(got, by_hand(raw_kernel, range(BN_BATCHES)), 1e-5)

    def test_raw_weights_are_bit_identical_after_evaluate(self):
        """evaluate() sees other weights and statistics; after it every model variable (the
        raw BatchNorm statistics too) is as before, bit for bit; the momentum too."""
        model = self.task.model
        before = values(model.variables)
        with self.task.evaluated_weights():
            inside = values(model.variables)
        self.assert_apart(inside, before, 1e-4)
        self.task.evaluate()
        for a, b in zip(values(model.variables), before, strict=True):
            self.assertAllEqual(a, b)
        self.assertEqual(model.get_layer("bn").momentum, 0.99)

    def test_mirrored_two_replicas_match_one_device(self):
        """2 logical CPUs (synchronized BatchNorm) ≡ this class's one-device run: the evaluated
        weights and statistics within a few ulps (≤ 1e-6 relative)."""
        options = TrainerOptions(train_steps=STEPS, steps_per_loop=10, **COMMON, **SWA)
        two = ArrayTask(self.x, self.y, options, model_fn=bn_model,
                        strategy=make_strategy("mirrored", cpu_replicas=2))  # fmt: skip
        two.train()
        self.assertEqual(int(stage(two).count.numpy()), len(TAKEN))
        with two.evaluated_weights():
            replicated = values(two.model.variables)
        with self.task.evaluated_weights():
            single = values(self.task.model.variables)
        for a, b in zip(replicated, single, strict=True):
            self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)
        self.assert_apart(values(two.model.variables), single, 1e-4)  # raw ≠ averaged

    def test_describe_and_techniques_name_the_schedule(self):
        table = self.task.penalty_table()
        self.assertIn("swa from step 3 every 4 (BN recalibrated over 3 batches)", table)
        self.assertIn("swa_every=4 after step 3 (evaluation and export use the average", table)


class SkippedStepTest(SwaTestCase):
    def test_skipped_mixed_float16_step_leaves_the_average_unchanged(self):
        """Every applied step takes a snapshot (swa_every=1); a step the loss scale makes
        non-finite under mixed_float16 leaves the average and its count bit for bit. Wrong
        variant: a snapshot on the skipped step (its `iterations` still satisfy the schedule)."""
        x, y = regression_data(n=64)
        options = TrainerOptions(train_steps=STEPS, swa_every=1, mixed_precision="mixed_float16",
                                 **COMMON)  # fmt: skip
        task = ArrayTask(x, y, options, model_fn=small_model)
        iterator = iter(task.train_dataset())
        task.train_loop.run(4, iterator)
        swa, optimizer = stage(task), task.optimizer
        self.assertGreater(int(optimizer.iterations), 0)
        self.assertEqual(int(swa.count.numpy()), int(optimizer.iterations))
        before, count = values(swa.averages.values()), int(swa.count.numpy())
        iterations = int(optimizer.iterations)
        optimizer.dynamic_scale.assign(2.0**60)  # float16 gradients overflow: skipped
        task.train_loop.run(1, iterator)
        self.assertEqual(int(optimizer.iterations), iterations)
        self.assertEqual(int(swa.count.numpy()), count)
        for a, b in zip(values(swa.averages.values()), before, strict=True):
            self.assertAllEqual(a, b)


class RunsTest(SwaTestCase):
    def test_export_and_keep_best_hold_the_averaged_recalibrated_weights(self):
        """Evaluations every 5 steps, the best (scripted) at step 15: best/ holds the model's
        variables as evaluated then, and the export (of the best) serves what the model under
        them computed. Wrong variants: the raw weights; the average without recalibration."""
        x, y = regression_data(n=64)
        root = self.create_tempdir().full_path
        seen = {}

        class Recording(ArrayTask):
            def evaluate(self, dataset=None):
                norm = self.model.get_layer("bn")
                statistics = values([norm.moving_mean, norm.moving_variance])
                raw_outputs = self.model(x, training=False).numpy()
                with self.evaluated_weights():
                    weights = values(self.model.variables)
                    outputs = self.model(x, training=False).numpy()
                    norm.moving_mean.assign(statistics[0])
                    norm.moving_variance.assign(statistics[1])
                    unrecalibrated = self.model(x, training=False).numpy()
                seen[self.step] = (weights, outputs, raw_outputs, unrecalibrated)
                return {"loss": abs(self.step - 15) + 1.0}

        options = TrainerOptions(
            train_steps=STEPS, eval_every=5, keep_best=True,
            model_dir=os.path.join(root, "run"), export_dir=os.path.join(root, "export"),
            **COMMON, **SWA,
        )  # fmt: skip
        task = Recording(x, y, options, model_fn=bn_model)
        self.assertEqual(task.train().best["step"], 15)
        weights, outputs, raw_outputs, unrecalibrated = seen[15]
        best = checkpoint_model_variables(os.path.join(root, "run", "best", "ckpt-15"))
        for a, b in zip(best, weights, strict=True):
            self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)
        exported = tf.saved_model.load(options.export_dir)
        served = exported.serve(tf.constant(x)).numpy()
        self.assertAllClose(served, outputs, rtol=1e-6, atol=1e-6)
        self.assert_apart([served], [raw_outputs], 1e-3)
        self.assert_apart([served], [unrecalibrated], 1e-3)

    def test_resume_is_bit_identical_and_swa_removed_or_added_is_said(self):
        """10 steps, then resumed to 20 ≡ 20 at once under deterministic=True: raw weights,
        averages, count and evaluated weights bit for bit. Resumed to 25 without SWA: logged;
        to 30 with swa_every=2 again: logged, and the average counts only snapshots from
        then on (26, 28, 30)."""
        x, y = regression_data(n=64)
        root = self.create_tempdir().full_path

        def run(model_dir, steps, **swa):
            options = TrainerOptions(train_steps=steps, deterministic=True, model_dir=model_dir,
                                     **COMMON, **swa)  # fmt: skip
            task = ArrayTask(x, y, options, model_fn=bn_model)
            with self.assertLogs(logger="absl", level="INFO") as logs:
                task.train()
            return task, "\n".join(logs.output)

        straight, _ = run(os.path.join(root, "straight"), STEPS, **SWA)
        model_dir = os.path.join(root, "run")
        run(model_dir, 10, **SWA)
        resumed, _ = run(model_dir, STEPS, **SWA)

        def state(task):
            swa = stage(task)
            averages = [swa.averages[v.path] for v in task.model.trainable_variables]
            with task.evaluated_weights():
                evaluated = values(task.model.variables)
            return [*values(task.model.variables), *values(averages), swa.count.numpy(),
                    *evaluated]  # fmt: skip

        self.assertEqual(int(stage(resumed).count.numpy()), len(TAKEN))
        for a, b in zip(state(resumed), state(straight), strict=True):
            self.assertAllEqual(a, b)

        _, removed = run(model_dir, 25)
        self.assertIn(f"Checkpoint {model_dir}/ckpt-20 holds swa_variables, which this run "
                      "does not keep (swa_every: 4 in the checkpointed run -> 0 now): not "
                      "restored", removed)  # fmt: skip
        added, log = run(model_dir, 30, swa_every=2)
        self.assertIn(f"Checkpoint {model_dir}/ckpt-25 holds no swa_variables (swa_every: 0 "
                      "in the checkpointed run -> 2 now)", log)  # fmt: skip
        self.assertEqual(int(stage(added).count.numpy()), 3)


class OptionsTest(SwaTestCase):
    def test_swa_with_ema_and_batchnorm_renorm_are_refused_in_one_line(self):
        with self.assertRaisesRegex(ConfigError, r"`swa_every` \(2\) and `ema_decay` \(0.9\)"
                                    ) as raised:  # fmt: skip
            TrainerOptions(swa_every=2, ema_decay=0.9)
        self.assertNotIn("\n", str(raised.exception))

        def renorm():
            norm = keras.layers.BatchNormalization(renorm=True, name="rn")
            return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2), norm])

        x, y = regression_data(n=16)
        task = ArrayTask(x, y, TrainerOptions(swa_every=2, train_steps=5), model_fn=renorm)
        with self.assertRaisesRegex(ConfigError, r"`swa_every` \(2\).*'rn' with renorm=True"
                                    ) as raised:  # fmt: skip
            task.build()
        self.assertNotIn("\n", str(raised.exception))

    def test_model_without_batchnorm_reads_no_batches(self):
        """A model without (trainable) BatchNorm: evaluated() swaps in the average and reads
        no training batch. Wrong variant: recalibrating anyway (a batch read)."""
        x, y = regression_data(n=64)
        reads = []

        class Counting(ArrayTask):
            def train_dataset(self):
                reads.append(1)
                return super().train_dataset()

        task = Counting(x, y, TrainerOptions(train_steps=5, swa_every=1, **COMMON),
                        model_fn=small_model)  # fmt: skip
        task.train_loop.run(3, iter(task.train_dataset()))
        raw = values(task.model.trainable_variables)
        count = len(reads)
        with task.evaluated_weights():
            self.assert_apart(values(task.model.trainable_variables), raw, 1e-4)
        self.assertLen(reads, count)
        self.assertEqual(stage(task).describe(), "swa from step 0 every 1")
