"""Proven correct: SAM and ASAM (`sam_rho`, `sam_adaptive`) against a hand-written two-pass
GradientTape reference, under accumulation, a mirrored strategy, loss scaling, clipping and
decoupled decay, and across a resume; each with a wrong variant that must land elsewhere."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from array_task import ArrayTask, batches, regression_data
from cli_runner import CliTestCase, context, run_cli
from test_equivalence import mlp

from trainer import L2, ConfigError, DecoupledWeightDecay, TrainerOptions
from trainer.distribution import make_strategy
from trainer.step.chain import techniques_line
from trainer.step.sam import ASAM_ETA, SharpnessAware

STEPS, BATCH, LAM = 10, 16, 0.05
ALL = lambda v: True  # noqa: E731
OPTIMIZERS = {
    "sgd": lambda **kw: keras.optimizers.SGD(0.05, **kw),
    "adam": lambda **kw: keras.optimizers.Adam(1e-2, **kw),
}


def named_mlp(regularizer=None) -> keras.Model:
    """`mlp` with fixed variable paths, so that a second instance can resume the first's run."""
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh", name="h"),
                             keras.layers.Dense(2, name="out")], name="net")  # fmt: skip


def relative_diff(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """The largest |got − want| of each array over that array's largest |want|."""
    return max(
        float(np.max(np.abs(g - w)) / np.max(np.abs(w))) for g, w in zip(got, want, strict=True)
    )


def reference(init, x, y, optimizer, rho, adaptive=False, lam=LAM, steps=STEPS, restore=True,
              split=1):  # fmt: skip
    """SAM/ASAM written out in eager TF on `mlp`'s weights: the MSE data loss + L2(lam) on
    every weight, ε from the gradient, the gradient again at w + ε, w put back, the optimizer
    applied to the second gradient. Wrong variants: `restore=False` (w + ε kept); `split=k`
    (each of k micro-batches perturbs by its own ε, the second gradients summed)."""
    weights = [tf.Variable(w) for w in init]

    def gradient(features, labels, share=1.0, penalty=True):
        with tf.GradientTape() as tape:
            k1, b1, k2, b2 = weights
            outputs = tf.tanh(features @ k1 + b1) @ k2 + b2
            loss = share * tf.reduce_mean(tf.square(labels - outputs))
            if penalty:
                loss += lam * tf.add_n([tf.reduce_sum(tf.square(w)) for w in weights])
        return tape.gradient(loss, weights)

    for features, labels in batches(x, y, BATCH, steps):
        if split > 1:
            parts = zip(np.split(features, split), np.split(labels, split), strict=True)
            seconds = [sam_gradient(weights, gradient, f, l_, rho, adaptive, 1 / split, i == 0)
                       for i, (f, l_) in enumerate(parts)]  # fmt: skip
            optimizer.apply_gradients(zip(map(sum, zip(*seconds)), weights))
            continue
        g = gradient(features, labels)
        if adaptive:
            t = [tf.abs(w) + ASAM_ETA for w in weights]
            norm = tf.linalg.global_norm([ti * gi for ti, gi in zip(t, g)])
            eps = [rho * ti * ti * gi / norm for ti, gi in zip(t, g)]
        else:
            norm = tf.linalg.global_norm(g)
            eps = [rho * gi / norm for gi in g]
        saved = [w.numpy() for w in weights]
        for w, e in zip(weights, eps):
            w.assign_add(e)
        second = gradient(features, labels)
        if restore:
            for w, s in zip(weights, saved):
                w.assign(s)
        optimizer.apply_gradients(zip(second, weights))
    return [w.numpy() for w in weights]


def sam_gradient(weights, gradient, features, labels, rho, adaptive, share, penalty):
    """One micro-batch's SAM gradient on its own ε (the `split` wrong variant)."""
    g = gradient(features, labels, share, penalty)
    t = [tf.abs(w) + ASAM_ETA if adaptive else tf.ones_like(w) for w in weights]
    norm = tf.linalg.global_norm([ti * gi for ti, gi in zip(t, g)])
    saved = [w.numpy() for w in weights]
    for w, ti, gi in zip(weights, t, g):
        w.assign_add(rho * ti * ti * gi / norm)
    second = gradient(features, labels, share, penalty)
    for w, s in zip(weights, saved):
        w.assign(s)
    return second


class SamTestBase(parameterized.TestCase, tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.x, cls.y = regression_data(n=80)
        keras.utils.set_random_seed(1)
        cls.init = mlp().get_weights()

    def make(self, optimizer, penalties=(), model_fn=mlp, strategy=None, **options):
        options = {"batch_size": BATCH, "train_steps": STEPS, "steps_per_loop": STEPS, **options}
        task = ArrayTask(self.x, self.y, TrainerOptions(**options), model_fn=model_fn,
                         optimizer=optimizer, penalties=penalties, strategy=strategy)  # fmt: skip
        task.model.set_weights(self.init)
        return task

    def run_task(self, *args, **kwargs) -> list[np.ndarray]:
        task = self.make(*args, **kwargs)
        task.train()
        return task.model.get_weights()

    def assert_near(self, got, want, tolerance=1e-6):
        diff = relative_diff(got, want)
        print(f"MEASURED {self.id()}: relative diff {diff:.2e} (tolerance {tolerance:g})")
        self.assertLessEqual(diff, tolerance)

    def assert_apart(self, wrong, want, margin=1e-4):
        diff = relative_diff(wrong, want)
        print(f"MEASURED {self.id()}: wrong variant {diff:.2e} (must exceed {margin:g})")
        self.assertGreater(diff, margin)


class SamReferenceTest(SamTestBase):
    @parameterized.named_parameters(
        ("sam_sgd", "sgd", 0.05, False),
        ("sam_adam", "adam", 0.05, False),
        ("asam_sgd", "sgd", 0.5, True),
        ("asam_adam", "adam", 0.5, True),
    )
    def test_sam_matches_two_pass_gradient_tape_reference(self, name, rho, adaptive):
        """SAM / ASAM with L2 over 10 steps ≡ the hand-written reference, relative ≤ 1e-6.
        Wrong variants: w + ε kept (not restored); the plain step (ρ = 0)."""
        got = self.run_task(OPTIMIZERS[name], [L2(LAM)], sam_rho=rho, sam_adaptive=adaptive)
        want = reference(self.init, self.x, self.y, OPTIMIZERS[name](), rho, adaptive)
        self.assert_near(got, want)
        kept = reference(self.init, self.x, self.y, OPTIMIZERS[name](), rho, adaptive,
                         restore=False)  # fmt: skip
        self.assert_apart(kept, want)
        plain = reference(self.init, self.x, self.y, OPTIMIZERS[name](), 0.0)
        self.assert_apart(plain, want)

    def test_sam_with_accumulation_matches_full_batch_reference(self):
        """accumulate_steps=2 (ε from the whole batch's gradient, then a second accumulated
        pass) ≡ the full-batch reference, Adam + L2, relative ≤ 1e-6. Wrong variant: each
        micro-batch perturbed by its own ε."""
        got = self.run_task(OPTIMIZERS["adam"], [L2(LAM)], sam_rho=0.05, accumulate_steps=2)
        want = reference(self.init, self.x, self.y, OPTIMIZERS["adam"](), 0.05)
        self.assert_near(got, want)
        each = reference(self.init, self.x, self.y, OPTIMIZERS["adam"](), 0.05, split=2)
        self.assert_apart(each, want)

    def test_sam_composes_with_clipping_and_decoupled_weight_decay(self):
        """SAM's second gradient clipped to global norm 0.3, decoupled decay, SGD ≡ the
        reference with Keras `SGD(weight_decay=wd, global_clipnorm=0.3)` applying the second
        gradient, relative ≤ 1e-6. Wrong variant: the same without clipping."""
        wd, clip = 0.2, 0.3
        got = self.run_task(OPTIMIZERS["sgd"], [L2(LAM), DecoupledWeightDecay(wd, include=ALL)],
                            sam_rho=0.05, clip_global_norm=clip)  # fmt: skip
        keras_sgd = OPTIMIZERS["sgd"](weight_decay=wd, global_clipnorm=clip)
        want = reference(self.init, self.x, self.y, keras_sgd, 0.05)
        self.assert_near(got, want)
        unclipped = reference(self.init, self.x, self.y, OPTIMIZERS["sgd"](weight_decay=wd), 0.05)
        self.assert_apart(unclipped, want)

    def test_sam_restores_the_weights_bit_for_bit(self):
        """With a learning rate of 0 the weights after 10 ASAM steps (compiled by XLA) are the
        initial ones, bit for bit (restored from a copy). Wrong variant: restored as
        w + ε − ε (checked by hand: fails)."""
        task = self.make(lambda: keras.optimizers.SGD(0.0), [L2(LAM)], sam_rho=0.5,
                         sam_adaptive=True, jit_compile=True)  # fmt: skip
        task.train()
        for got, want in zip(task.model.get_weights(), self.init, strict=True):
            self.assertAllEqual(got, want)

    def test_sam_rho_zero_is_the_plain_step_bit_for_bit(self):
        """sam_rho=0 adds no stage: the weights equal a run without the option, bit for bit.
        Wrong variant: a stage with ρ = 0 in the chain (refused by the stage check; its
        weights would stay equal, ε being 0)."""
        plain = self.make(OPTIMIZERS["adam"], [L2(LAM)])
        zero = self.make(OPTIMIZERS["adam"], [L2(LAM)], sam_rho=0.0)
        self.assertIsNone(zero.built.chain.stage(SharpnessAware))
        self.assertEqual(zero.built.chain.describe(), plain.built.chain.describe())
        plain.train()
        zero.train()
        for got, want in zip(zero.model.get_weights(), plain.model.get_weights(), strict=True):
            self.assertAllEqual(got, want)

    def test_sam_describe_and_bad_values(self):
        """The chain and the techniques line name SAM / ASAM and ρ; ρ < 0 or NaN is refused in
        one line naming `sam_rho` and its value."""
        sam = self.make(OPTIMIZERS["sgd"], sam_rho=0.05)
        self.assertIn("gradients -> sam_rho=0.05", sam.built.chain.describe())
        options = TrainerOptions(sam_rho=0.5, sam_adaptive=True)
        self.assertIn("asam_rho=0.5 (two gradient passes per step)", techniques_line(options))
        for bad in (-1.0, float("nan")):
            with self.assertRaisesRegex(ConfigError, rf"^`sam_rho` \({bad}\)[^\n]*$"):
                TrainerOptions(sam_rho=bad)


class SamDistributedTest(SamTestBase):
    @parameterized.named_parameters(("sam", False), ("asam_accumulated", True))
    def test_sam_under_mirrored_strategy_matches_one_device_reference(self, adaptive):
        """2 replicas on logical CPUs ≡ the one-device reference (which one device matches,
        `SamReferenceTest`), Adam + L2, relative ≤ 1e-6; ASAM also with accumulate_steps=2 on
        the replicas. Wrong variants: ε from each replica's own gradient (checked by hand:
        2.7e-2 apart); the plain step."""
        rho = 0.5 if adaptive else 0.05
        two = self.run_task(OPTIMIZERS["adam"], [L2(LAM)], sam_rho=rho, sam_adaptive=adaptive,
                            accumulate_steps=2 if adaptive else 1,
                            strategy=make_strategy("mirrored", cpu_replicas=2))  # fmt: skip
        want = reference(self.init, self.x, self.y, OPTIMIZERS["adam"](), rho, adaptive)
        self.assert_near(two, want)
        plain = reference(self.init, self.x, self.y, OPTIMIZERS["adam"](), 0.0)
        self.assert_apart(plain, want)


class SamLossScaleTest(SamTestBase):
    def test_sam_nonfinite_first_gradient_skips_the_step_under_mixed_float16(self):
        """mixed_float16 with a loss scale of 2^100: the float16 gradients overflow, the step
        is skipped with every weight unchanged bit for bit and the scale lowered; at a scale
        of 2^10 the next step applies."""
        task = self.make(OPTIMIZERS["sgd"], [L2(LAM)], sam_rho=0.05,
                         mixed_precision="mixed_float16")  # fmt: skip
        optimizer = task.optimizer
        optimizer.dynamic_scale.assign(2.0**100)
        before = task.model.get_weights()
        iterator = iter(task.train_dataset())
        task.train_loop.run(1, iterator)
        self.assertEqual(int(optimizer.iterations), 0)
        self.assertLess(float(optimizer.dynamic_scale), 2.0**100)
        for got, want in zip(task.model.get_weights(), before, strict=True):
            self.assertAllEqual(got, want)
        optimizer.dynamic_scale.assign(2.0**10)
        task.train_loop.run(1, iterator)
        self.assertEqual(int(optimizer.iterations), 1)
        moved = max(float(np.max(np.abs(a - b))) for a, b in zip(task.model.get_weights(), before))
        self.assertGreater(moved, 1e-4)


class SamResumeTest(SamTestBase):
    def test_sam_checkpoint_resume_is_bit_identical(self):
        """ASAM, deterministic: 10 steps, stop, resume to 20 ≡ 20 steps at once, bit for bit."""
        options = {"sam_rho": 0.5, "sam_adaptive": True, "deterministic": True,
                   "model_fn": named_mlp, "train_steps": 2 * STEPS}  # fmt: skip
        straight = self.run_task(OPTIMIZERS["adam"], [L2(LAM)], **options)
        model_dir = self.create_tempdir().full_path
        options.update(model_dir=model_dir, checkpoint_every=STEPS)
        self.run_task(OPTIMIZERS["adam"], [L2(LAM)], **{**options, "train_steps": STEPS})
        resumed = self.make(OPTIMIZERS["adam"], [L2(LAM)], **options)
        resumed.train()
        self.assertEqual(int(resumed.optimizer.iterations), 2 * STEPS)
        for got, want in zip(resumed.model.get_weights(), straight, strict=True):
            self.assertAllEqual(got, want)


class SamCliTest(CliTestCase):
    def test_sam_flags_from_the_command_line(self):
        """--sam_rho with --sam_adaptive trains the default task (exit 0) with ASAM in the
        techniques and step lines; --sam_rho=nan is a one-line usage error (exit 2)."""
        result = run_cli("--sam_rho=0.5", "--sam_adaptive", "--train_steps=20")
        self.assertEqual(result.returncode, 0, context(result))
        output = result.stderr + result.stdout
        self.assertIn("techniques: asam_rho=0.5 (two gradient passes per step)", output)
        self.assertIn("gradients -> asam_rho=0.5 -> ", output)
        self.assert_usage_error(run_cli("--sam_rho=nan"), "`sam_rho` (nan)")


if __name__ == "__main__":
    tf.test.main()
