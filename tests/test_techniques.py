"""Proven correct: LR schedules with warmup, global-norm clipping, gradient accumulation and the
EMA of the weights, each against Keras (or one full-batch step), with a wrong variant that must
land elsewhere so the tolerance can be seen to bite. Same init, same batches, as in
test_equivalence."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from array_task import ArrayTask
from test_equivalence import BATCH, STEPS, EquivalenceTestBase, max_abs_diff, mlp

from trainer import (
    L2,
    ConfigError,
    DecoupledWeightDecay,
    SelectiveL2,
    TrainerOptions,
    WarmupSchedule,
    learning_rate_for,
)
from trainer.distribution import make_strategy
from trainer.step.clipping import Clipping

ALL = lambda v: True  # noqa: E731 -- Keras' optimizers decay every variable by default
OPTIMIZERS = {
    "sgd": lambda lr=0.05, **kw: keras.optimizers.SGD(lr, **kw),
    "adam": lambda lr=1e-2, **kw: keras.optimizers.Adam(lr, **kw),
}


def named_mlp(regularizer=None) -> keras.Model:
    """`mlp` with fixed variable paths, so that a second instance can resume the first's run."""
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh", name="h"),
                             keras.layers.Dense(2, name="out")], name="net")  # fmt: skip


class TechniqueTestBase(EquivalenceTestBase):
    def make(self, optimizer_fn=None, penalties=(), strategy=None, regularizer=None,
             model_fn=mlp, **options):  # fmt: skip
        options = {"batch_size": BATCH, "train_steps": STEPS, "steps_per_loop": 10, **options}
        task = ArrayTask(self.x, self.y, TrainerOptions(**options),
                         model_fn=lambda: model_fn(regularizer), optimizer=optimizer_fn,
                         penalties=penalties, strategy=strategy)  # fmt: skip
        task.model.set_weights(self.init)
        return task

    def assert_near(self, got, reference, tolerance):
        diff = max_abs_diff(got, reference)
        print(f"MEASURED {self.id()}: max |diff| {diff:.2e} (tolerance {tolerance:g})")
        self.assertLessEqual(diff, tolerance)

    def assert_apart(self, wrong, reference, margin):
        diff = max_abs_diff(wrong, reference)
        print(f"MEASURED {self.id()}: wrong variant {diff:.2e} (must exceed {margin:g})")
        self.assertGreater(diff, margin)

    def run_task(self, *args, **kwargs):
        """Trains; returns (raw weights, the weights evaluation and export use)."""
        task = self.make(*args, **kwargs)
        task.train()
        with task.evaluated_weights():
            averaged = task.model.get_weights()
        return task.model.get_weights(), averaged

    def fit(self, optimizer, regularizer=None, batch_size=BATCH, steps=STEPS):
        model = mlp(regularizer)
        model.set_weights(self.init)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(self.x, self.y, batch_size=batch_size, epochs=steps * batch_size // len(self.x),
                  shuffle=False, verbose=0)  # fmt: skip
        model.optimizer.finalize_variable_values(model.trainable_variables)  # EMA, if any
        return model.get_weights()


class ScheduleTest(TechniqueTestBase):
    """`lr_schedule` + `warmup_steps` ≡ Keras `CosineDecay(0, T − W, warmup_target=lr, W)`."""

    def test_cosine_warmup_schedule_matches_keras_cosine_decay_every_step(self):
        """Every step 0..T+10, relative ≤ 1e-6 (measured: see the report); also with an
        end_learning_rate (Keras' alpha). Wrong variant: no warmup, off by far more."""
        for end in (0.0, 1e-3):
            ours = WarmupSchedule("cosine", 1e-2, 400, 50, end)
            keras_ = keras.optimizers.schedules.CosineDecay(
                0.0, 350, alpha=end / 1e-2, warmup_target=1e-2, warmup_steps=50
            )
            steps = np.arange(411)
            got = np.array([float(ours(s)) for s in steps])
            want = np.array([float(keras_(s)) for s in steps])
            rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-12)
            print(f"MEASURED cosine end={end}: max relative {rel[want > 0].max():.2e}")
            self.assertLessEqual(rel[want > 0].max(), 1e-6)
            self.assertLessEqual(np.abs(got[want == 0]).max(), 1e-12)
        no_warmup = np.array([float(WarmupSchedule("cosine", 1e-2, 400)(s)) for s in steps])
        self.assertGreater(np.abs(no_warmup - want).max(), 1e-3)

    def test_linear_warmup_schedule_matches_keras_polynomial_decay_every_step(self):
        """Linear: warmup `lr·t/W`, then Keras `PolynomialDecay(lr, T − W, end, power=1)` at
        t − W; relative ≤ 1e-6. Wrong variant: cosine."""
        ours = WarmupSchedule("linear", 1e-2, 400, 50, 1e-4)
        decay = keras.optimizers.schedules.PolynomialDecay(1e-2, 350, 1e-4, power=1.0)
        steps = np.arange(1, 411)
        want = np.array([1e-2 * s / 50 if s < 50 else float(decay(s - 50)) for s in steps])
        got = np.array([float(ours(s)) for s in steps])
        print(f"MEASURED linear: max relative {(np.abs(got - want) / want).max():.2e}")
        self.assertLessEqual((np.abs(got - want) / want).max(), 1e-6)
        cosine = np.array([float(WarmupSchedule("cosine", 1e-2, 400, 50, 1e-4)(s)) for s in steps])
        self.assertGreater(np.abs(cosine - want).max(), 1e-4)

    @parameterized.named_parameters(("sgd", "sgd", 0.1), ("adam", "adam", 1e-2))
    def test_warmup_schedule_training_matches_keras_fit(self, name, lr):
        """The default build_optimizer follows the options: training ≡ `model.fit` with the
        same optimizer on Keras' CosineDecay with warmup, ≤ 1e-5; its learning_rate at the
        end ≡ Keras' at step T. Wrong variant: the constant rate."""
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0, STEPS - 10, warmup_target=lr, warmup_steps=10
        )
        reference = self.fit(OPTIMIZERS[name](schedule))
        task = self.make(None, optimizer=name, learning_rate=lr, lr_schedule="cosine",
                         warmup_steps=10)  # fmt: skip
        task.train()
        self.assert_near(task.model.get_weights(), reference, 1e-5)
        self.assertAllClose(float(task.optimizer.learning_rate), float(schedule(STEPS)), rtol=1e-6)
        constant, _ = self.run_task(None, optimizer=name, learning_rate=lr)
        self.assert_apart(constant, reference, 1e-4)


class ClipTest(TechniqueTestBase):
    """`clip_global_norm=c` ≡ Keras `global_clipnorm=c` with the same penalties in the loss."""

    @parameterized.named_parameters(("sgd", "sgd"), ("adam", "adam"))
    def test_clip_matches_keras_global_clipnorm_with_regularizers(self, name):
        """L2 kernels (a tapeloop SelectiveL2 vs Keras kernel_regularizer) and the norm of the
        whole gradient clipped, ≤ 1e-6. Wrong variants: unclipped; the L2 left out of the
        clipped norm (it comes from a Keras regularizer, clipped in both)."""
        clip, lam = 0.3, 0.05
        reference = self.fit(OPTIMIZERS[name](global_clipnorm=clip), keras.regularizers.l2(lam))
        penalties = [SelectiveL2(lam, include="kernel")]
        got, _ = self.run_task(OPTIMIZERS[name], penalties, clip_global_norm=clip)
        self.assert_near(got, reference, 1e-6)
        keras_reg, _ = self.run_task(OPTIMIZERS[name], regularizer=keras.regularizers.l2(lam),
                                     clip_global_norm=clip)  # fmt: skip
        self.assert_near(keras_reg, reference, 1e-6)
        unclipped, _ = self.run_task(OPTIMIZERS[name], penalties)
        self.assert_apart(unclipped, reference, 1e-3)

    def test_clip_under_loss_scaling_clips_the_unscaled_norm(self):
        """Gradients scaled by a LossScaleOptimizer (2^10) are clipped by their unscaled norm:
        ≡ the same clip without loss scaling, ≤ 1e-6. Wrong variant: unclipped."""
        clip = 0.3
        reference, _ = self.run_task(OPTIMIZERS["sgd"], [L2(0.05)], clip_global_norm=clip)
        scaled, _ = self.run_task(
            lambda: keras.optimizers.LossScaleOptimizer(OPTIMIZERS["sgd"](), initial_scale=2.0**10),
            [L2(0.05)],
            clip_global_norm=clip,
        )
        self.assert_near(scaled, reference, 1e-6)
        unclipped, _ = self.run_task(OPTIMIZERS["sgd"], [L2(0.05)])
        self.assert_apart(unclipped, reference, 1e-3)

    def test_clip_leaves_decoupled_decay_unclipped(self):
        """SGD + DecoupledWeightDecay(wd) + clip ≡ Keras `SGD(weight_decay=wd,
        global_clipnorm=c)` (decay before the update, outside the gradient), ≤ 1e-6. Wrong
        variant: the same decay as an L2 gradient (SGD's equivalent, L2(wd/2)), clipped."""
        clip, wd = 0.3, 0.2
        reference = self.fit(keras.optimizers.SGD(0.05, weight_decay=wd, global_clipnorm=clip))
        got, _ = self.run_task(OPTIMIZERS["sgd"], [DecoupledWeightDecay(wd, include=ALL)],
                               clip_global_norm=clip)  # fmt: skip
        self.assert_near(got, reference, 1e-6)
        as_l2, _ = self.run_task(OPTIMIZERS["sgd"], [L2(wd / 2)], clip_global_norm=clip)
        self.assert_apart(as_l2, reference, 1e-4)

    def test_clip_under_mirrored_strategy_uses_the_global_norm(self):
        """2 replicas on logical CPUs ≡ one device, both clipped, ≤ 1e-5 (each replica
        clipping its own half would not be). Wrong variant: unclipped. The grad_norm
        summary variable holds the global pre-clip norm."""
        clip = 0.3
        one, _ = self.run_task(OPTIMIZERS["adam"], [L2(0.05)], clip_global_norm=clip)
        two = self.make(OPTIMIZERS["adam"], [L2(0.05)], clip_global_norm=clip,
                        strategy=make_strategy("mirrored", cpu_replicas=2))  # fmt: skip
        two.train()
        self.assert_near(two.model.get_weights(), one, 1e-5)
        self.assertGreater(float(two.built.chain.stage(Clipping).grad_norm.numpy()), clip)
        unclipped, _ = self.run_task(OPTIMIZERS["adam"], [L2(0.05)])
        self.assert_apart(unclipped, one, 1e-3)


class AccumulateTest(TechniqueTestBase):
    """`accumulate_steps=k` on batch B ≡ one step on the whole batch B."""

    @parameterized.named_parameters(
        ("sgd_l2", "sgd", lambda: [L2(0.05)]),
        ("adam_l2", "adam", lambda: [L2(0.05)]),
        ("sgd_decoupled", "sgd", lambda: [DecoupledWeightDecay(0.2, include=ALL)]),
        ("adam_decoupled_and_l2", "adam",
         lambda: [DecoupledWeightDecay(0.2, exclude="bias"), SelectiveL2(0.05, include="kernel")]),
    )  # fmt: skip
    def test_accumulate_matches_full_batch(self, name, penalties):
        """k=4 micro-batches of 4 ≡ batches of 16, ≤ 1e-5, with a Keras regularizer too.
        Wrong variant: 4 optimizer steps on the micro-batches (what k=4 must not be)."""
        reg = keras.regularizers.l2(0.01)
        full, _ = self.run_task(OPTIMIZERS[name], penalties(), regularizer=reg)
        task = self.make(OPTIMIZERS[name], penalties(), regularizer=reg, accumulate_steps=4)
        task.train()
        self.assert_near(task.model.get_weights(), full, 1e-5)
        self.assertEqual(int(task.optimizer.iterations), STEPS)  # optimizer steps
        micro, _ = self.run_task(OPTIMIZERS[name], penalties(), regularizer=reg,
                                 batch_size=BATCH // 4, train_steps=STEPS * 4)  # fmt: skip
        self.assert_apart(micro, full, 1e-3)

    def test_accumulate_under_mirrored_strategy(self):
        """2 replicas × k=2 micro-batches ≡ one device, full batch, Adam + L2 + decoupled
        decay, ≤ 1e-5. Wrong variant: micro-batch steps."""
        penalties = lambda: [L2(0.05), DecoupledWeightDecay(0.2, exclude="bias")]  # noqa: E731
        full, _ = self.run_task(OPTIMIZERS["adam"], penalties())
        two = self.make(OPTIMIZERS["adam"], penalties(), accumulate_steps=2,
                        strategy=make_strategy("mirrored", cpu_replicas=2))  # fmt: skip
        two.train()
        self.assert_near(two.model.get_weights(), full, 1e-5)
        micro, _ = self.run_task(OPTIMIZERS["adam"], penalties(), batch_size=BATCH // 2,
                                 train_steps=STEPS * 2)  # fmt: skip
        self.assert_apart(micro, full, 1e-3)

    def test_accumulate_clips_the_summed_gradient(self):
        """k=4 + clip ≡ Keras `global_clipnorm` on the full batch, ≤ 1e-5. Wrong variant:
        the same without clipping."""
        reference = self.fit(keras.optimizers.Adam(1e-2, global_clipnorm=0.3))
        got, _ = self.run_task(OPTIMIZERS["adam"], accumulate_steps=4, clip_global_norm=0.3)
        self.assert_near(got, reference, 1e-5)
        unclipped, _ = self.run_task(OPTIMIZERS["adam"], accumulate_steps=4)
        self.assert_apart(unclipped, reference, 1e-3)

    def test_accumulate_config_errors(self):
        """A batch not divisible by k, k = 0, and a Keras optimizer's own accumulation."""
        with self.assertRaisesRegex(ConfigError, r"`accumulate_steps` \(3\).*`batch_size` \(16\)"):
            TrainerOptions(batch_size=16, accumulate_steps=3)
        with self.assertRaisesRegex(ConfigError, r"`accumulate_steps` \(0\)"):
            TrainerOptions(accumulate_steps=0)
        with self.assertRaisesRegex(ConfigError, "gradient_accumulation_steps=2.*accumulate_steps"):
            self.make(lambda: keras.optimizers.Adam(gradient_accumulation_steps=2)).build()


class EmaTest(TechniqueTestBase):
    """`ema_decay=d` ≡ Keras `use_ema=True, ema_momentum=d` + `finalize_variable_values`."""

    @parameterized.named_parameters(("sgd", "sgd"), ("adam", "adam"))
    def test_ema_matches_keras_use_ema(self, name):
        """The averaged weights ≡ Keras' finalized EMA, ≤ 1e-5, with decoupled decay; the raw
        weights ≡ training without EMA. Wrong variants: the raw weights; ema_decay 0.95."""
        wd = 0.1
        reference = self.fit(OPTIMIZERS[name](weight_decay=wd, use_ema=True, ema_momentum=0.9))
        plain = self.fit(OPTIMIZERS[name](weight_decay=wd))
        decay = lambda: [DecoupledWeightDecay(wd, include=ALL)]  # noqa: E731
        raw, averaged = self.run_task(OPTIMIZERS[name], decay(), ema_decay=0.9)
        self.assert_near(averaged, reference, 1e-5)
        self.assert_near(raw, plain, 1e-5)
        self.assert_apart(raw, reference, 1e-3)
        _, other = self.run_task(OPTIMIZERS[name], decay(), ema_decay=0.95)
        self.assert_apart(other, reference, 1e-4)

    def test_ema_with_accumulation_runs_once_per_optimizer_step(self):
        """k=4 with EMA ≡ Keras EMA on the full batch, ≤ 1e-5. Wrong variant: k steps'
        worth of EMA updates (the micro-batch run)."""
        reference = self.fit(keras.optimizers.Adam(1e-2, use_ema=True, ema_momentum=0.9))
        _, got = self.run_task(OPTIMIZERS["adam"], accumulate_steps=4, ema_decay=0.9)
        self.assert_near(got, reference, 1e-5)
        _, micro = self.run_task(OPTIMIZERS["adam"], batch_size=BATCH // 4,
                                 train_steps=STEPS * 4, ema_decay=0.9)  # fmt: skip
        self.assert_apart(micro, reference, 1e-3)

    def test_ema_evaluation_uses_the_average_and_training_the_raw_weights(self):
        """evaluate() gives the averaged weights' loss, then the raw weights are back bit for
        bit; the export is made from the averaged weights."""
        task = self.make(OPTIMIZERS["adam"], ema_decay=0.9, eval_every=25,
                         export_dir=self.create_tempdir().full_path)  # fmt: skip
        task.train()
        raw = task.model.get_weights()
        with task.evaluated_weights():
            averaged = task.model.get_weights()
            mse = float(np.mean(np.square(task.model.predict(self.x, verbose=0) - self.y)))
        self.assert_apart(raw, averaged, 1e-3)
        self.assertAllClose(task.evaluate()["loss"], mse, rtol=1e-5)
        self.assertEqual(max_abs_diff(task.model.get_weights(), raw), 0.0)
        exported = tf.saved_model.load(task.options.export_dir)
        outputs = exported.serve(tf.constant(self.x)).numpy()
        self.assertAllClose(np.mean(np.square(outputs - self.y)), mse, rtol=1e-5)

    def test_ema_checkpointed_for_exact_resume(self):
        """30 steps, stop, resume to 50 ≡ 50 steps at once: EMA bit-identical."""
        _, straight = self.run_task(OPTIMIZERS["adam"], ema_decay=0.9, deterministic=True)
        model_dir = self.create_tempdir().full_path
        options = {"ema_decay": 0.9, "deterministic": True, "model_dir": model_dir,
                   "model_fn": named_mlp}  # fmt: skip
        self.make(OPTIMIZERS["adam"], train_steps=30, **options).train()
        resumed = self.make(OPTIMIZERS["adam"], **options)
        resumed.train()
        with resumed.evaluated_weights():
            self.assertEqual(max_abs_diff(resumed.model.get_weights(), straight), 0.0)
        self.assertIn("ema_variables", resumed.checkpoint_objects())

    def test_ema_skipped_when_loss_scale_optimizer_skips(self):
        """A skipped step (overflowing loss scale) leaves the EMA unchanged; the first
        applied step sets it to the weights (Keras: ema = w at iterations 0)."""
        task = self.make(
            lambda: keras.optimizers.LossScaleOptimizer(
                keras.optimizers.SGD(0.05), initial_scale=2.0**127
            ),
            ema_decay=0.9,
        )
        task.model.set_weights([w * 1e3 for w in self.init])
        averages = task.checkpoint_objects()["ema_variables"]
        before = [v.numpy() for v in averages.values()]
        iterator = iter(task.train_dataset())
        task.train_loop.run(1, iterator)
        self.assertEqual(int(task.optimizer.iterations), 0)
        self.assertEqual(max_abs_diff([v.numpy() for v in averages.values()], before), 0.0)
        while int(task.optimizer.iterations) == 0:
            task.train_loop.run(1, iterator)
        after = [averages[v.path].numpy() for v in task.model.trainable_variables]
        self.assertEqual(max_abs_diff(after, task.model.get_weights()), 0.0)
        self.assert_apart(after, before, 1e-3)  # wrong variant: not updated

    def test_ema_under_mirrored_strategy(self):
        """2 replicas ≡ one device, the averaged weights, ≤ 1e-5."""
        _, one = self.run_task(OPTIMIZERS["adam"], [L2(0.05)], ema_decay=0.9)
        two = self.make(OPTIMIZERS["adam"], [L2(0.05)], ema_decay=0.9,
                        strategy=make_strategy("mirrored", cpu_replicas=2))  # fmt: skip
        two.train()
        with two.evaluated_weights():
            self.assert_near(two.model.get_weights(), one, 1e-5)
        self.assert_apart(two.model.get_weights(), one, 1e-3)

    def test_ema_config_errors(self):
        """ema_decay outside [0, 1); a user optimizer with use_ema=True."""
        for bad in (1.0, 1.5, -0.1):
            with self.assertRaisesRegex(ConfigError, r"`ema_decay`"):
                TrainerOptions(ema_decay=bad)
        with self.assertRaisesRegex(ConfigError, "use_ema=True.*ema_decay"):
            self.make(lambda: keras.optimizers.Adam(use_ema=True)).build()


class OptionErrorsTest(TechniqueTestBase):
    def test_schedule_and_clip_config_errors(self):
        for options, pattern in [
            ({"warmup_steps": 11, "train_steps": 10}, r"`warmup_steps` \(11\).*from 0 to 10"),
            ({"lr_schedule": "bogus"}, r"`lr_schedule` \('bogus'\).*constant, cosine, linear"),
            ({"clip_global_norm": -1.0}, r"`clip_global_norm` \(-1.0\)"),
            ({"end_learning_rate": 1e-4}, r"needs lr_schedule cosine or linear"),
            ({"lr_schedule": "cosine", "end_learning_rate": 1.0}, r"at most `learning_rate`"),
        ]:
            with self.assertRaisesRegex(ConfigError, pattern):
                TrainerOptions(**options)

    def test_overridden_build_optimizer_must_follow_a_schedule(self):
        """A task's own optimizer with --lr_schedule: refused, unless it uses
        learning_rate_for(options)."""
        with self.assertRaisesRegex(ConfigError, "does not use them.*learning_rate_for"):
            self.make(OPTIMIZERS["sgd"], lr_schedule="cosine").build()
        options = TrainerOptions(lr_schedule="linear", warmup_steps=5, train_steps=20)
        self.make(lambda: keras.optimizers.SGD(learning_rate_for(options)),
                  lr_schedule="linear", warmup_steps=5, train_steps=20).build()  # fmt: skip


if __name__ == "__main__":
    tf.test.main()
