"""Proven correct: penalties against Keras, the AdamW paper, NumPy re-implementations and ridge.

Each test names the reference it matches. Every comparison trains from the same initial weights
on the same batches (`ArrayTask` yields them in order, and `model.fit(shuffle=False)` too), and
most carry a deliberately wrong variant that must differ, so the tolerance can be seen to bite.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from array_task import ArrayTask, regression_data

from trainer import L2, DecoupledWeightDecay, SelectiveL2, TrainerOptions

STEPS, BATCH = 50, 16
ALL = lambda v: True  # noqa: E731 -- Keras' optimizers decay every variable by default


def mlp(regularizer=None) -> keras.Model:
    """4 -> Dense(8, tanh) -> Dense(2): kernels and biases, optionally Keras-regularized."""
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh", kernel_regularizer=regularizer),
            keras.layers.Dense(2, kernel_regularizer=regularizer),
        ]
    )


def linear(features: int, outputs: int = 1) -> keras.Model:
    return keras.Sequential([keras.Input((features,)), keras.layers.Dense(outputs, use_bias=False)])


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


class EquivalenceTestBase(parameterized.TestCase, tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.x, self.y = regression_data(n=80)  # 5 batches of 16 per epoch, 10 epochs = 50 steps
        keras.utils.set_random_seed(1)
        self.init = mlp().get_weights()

    def train(self, optimizer, penalties=(), model_fn=mlp, steps=STEPS, **options):
        """Trains with tapeloop from `self.init`; returns the final weights."""
        task = ArrayTask(
            self.x,
            self.y,
            TrainerOptions(batch_size=BATCH, train_steps=steps, steps_per_loop=10, **options),
            model_fn=model_fn,
            optimizer=optimizer,
            penalties=penalties,
        )
        task.model.set_weights(self.init)
        task.train()
        return task.model.get_weights()


class KerasRegularizerTest(EquivalenceTestBase):
    """`SelectiveL2(λ, include='kernel')` ≡ `kernel_regularizer=keras.regularizers.l2(λ)`."""

    def fit(self, optimizer, lam):
        model = mlp(keras.regularizers.l2(lam))
        model.set_weights(self.init)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(self.x, self.y, batch_size=BATCH, epochs=STEPS * BATCH // len(self.x),
                  shuffle=False, verbose=0)  # fmt: skip
        return model.get_weights()

    @parameterized.named_parameters(
        ("sgd", lambda: keras.optimizers.SGD(0.05)),
        ("adam", lambda: keras.optimizers.Adam(1e-2)),
    )
    def test_matches_model_fit_with_kernel_regularizer(self, make_optimizer):
        """Reference: Keras `model.fit` with `l2(λ)` kernel regularizers, 50 steps, ≤ 1e-5."""
        lam = 0.05
        reference = self.fit(make_optimizer(), lam)
        got = self.train(make_optimizer, [SelectiveL2(lam, include="kernel")])
        self.assertLessEqual(max_abs_diff(got, reference), 1e-5)
        # The check bites: regularizing the biases too, or with λ/2, lands elsewhere.
        all_vars = self.train(make_optimizer, [L2(lam)])
        half = self.train(make_optimizer, [SelectiveL2(lam / 2, include="kernel")])
        self.assertGreater(max_abs_diff(all_vars, reference), 1e-4)
        self.assertGreater(max_abs_diff(half, reference), 1e-4)


class KerasAdamWTest(EquivalenceTestBase):
    """Adam + `DecoupledWeightDecay(wd)` ≡ `keras.optimizers.AdamW(weight_decay=wd)`."""

    @parameterized.named_parameters(
        ("constant_lr", lambda: 1e-2, None),
        ("schedule", lambda: keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5), None),
        ("exclusion", lambda: 1e-2, "bias"),
    )
    def test_matches_keras_adamw(self, make_lr, exclude):
        """Reference: Keras `AdamW` (its `exclude_from_weight_decay` for the exclusion), ≤ 1e-5."""
        wd = 0.1

        def adamw():
            optimizer = keras.optimizers.AdamW(make_lr(), weight_decay=wd)
            if exclude:
                optimizer.exclude_from_weight_decay(var_names=[exclude])
            return optimizer

        reference = self.train(adamw)
        got = self.train(
            lambda: keras.optimizers.Adam(make_lr()),
            [DecoupledWeightDecay(wd, include=ALL, exclude=exclude)],
        )
        self.assertLessEqual(max_abs_diff(got, reference), 1e-5)
        no_decay = self.train(lambda: keras.optimizers.Adam(make_lr()))
        self.assertGreater(max_abs_diff(no_decay, reference), 1e-4)


class PaperPropositionTest(EquivalenceTestBase):
    """Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019), Prop. 1.

    For plain SGD, L2 regularization with `λ' = λ/α` is weight decay with `λ`; in tapeloop's
    conventions (`L2(s)` adds `s·Σw²`, gradient `2sw`; decay is `lr·rate·w`), `L2(λ/2)` ≡
    `DecoupledWeightDecay(λ)`. Under Adam the L2 gradient `λw` is divided by `√v̂`, the running
    RMS of the whole gradient, so weights with large gradients are decayed less: the two
    differ, which is why AdamW exists.
    """

    def test_sgd_l2_half_equals_decoupled_decay(self):
        """SGD: `L2(λ/2)` and `DecoupledWeightDecay(λ)` on all variables agree to 1e-6."""
        lam = 0.2
        l2 = self.train(lambda: keras.optimizers.SGD(0.05), [L2(lam / 2)])
        decay = self.train(
            lambda: keras.optimizers.SGD(0.05), [DecoupledWeightDecay(lam, include=ALL)]
        )
        self.assertLessEqual(max_abs_diff(l2, decay), 1e-6)

    def test_adam_l2_differs_from_decoupled_decay(self):
        """Adam: the same pair differs by more than 0.1 after 50 steps (measured: 0.48)."""
        lam = 0.2
        l2 = self.train(lambda: keras.optimizers.Adam(1e-2), [L2(lam / 2)])
        decay = self.train(
            lambda: keras.optimizers.Adam(1e-2), [DecoupledWeightDecay(lam, include=ALL)]
        )
        self.assertGreater(max_abs_diff(l2, decay), 0.1)


class CouplingTest(EquivalenceTestBase):
    """Each decay coupling, step by step, against a float64 NumPy re-implementation.

    Model: a bias-free linear layer `y = xW` with MSE, trained by SGD with a schedule
    `lr_t = 0.1·0.8^t`; the reference update is `W ← W − d_t·W − lr_t·∇(W)` with
    `d_t = lr_t·rate` (Keras/PyTorch/optax), `(lr_t/lr_0)·rate` (the paper's η_t), or `rate`
    (TF-Addons' absolute decay).
    """

    @parameterized.named_parameters(
        ("learning_rate", "learning_rate", lambda lr, lr0, rate: lr * rate),
        ("schedule", "schedule", lambda lr, lr0, rate: lr / lr0 * rate),
        ("absolute", "absolute", lambda lr, lr0, rate: rate),
    )
    def test_coupling_matches_numpy(self, coupling, decay, rate=0.05):
        schedule = lambda: keras.optimizers.schedules.ExponentialDecay(0.1, 1, 0.8)  # noqa: E731
        task = ArrayTask(
            self.x,
            self.y,
            TrainerOptions(batch_size=BATCH, train_steps=8),
            model_fn=lambda: linear(4, 2),
            optimizer=lambda: keras.optimizers.SGD(schedule()),
            penalties=[DecoupledWeightDecay(rate, coupling=coupling)],
        )
        w = task.model.get_weights()[0].astype(np.float64)
        iterator = iter(task.train_dataset())
        for t in range(8):
            x = self.x[t * BATCH % len(self.x) :][:BATCH].astype(np.float64)
            y = self.y[t * BATCH % len(self.x) :][:BATCH].astype(np.float64)
            lr = 0.1 * 0.8**t
            gradient = 2 * x.T @ (x @ w - y) / y.size
            w = w - decay(lr, 0.1, rate) * w - lr * gradient
            task.train_loop.run(1, iterator)
            self.assertAllClose(
                task.model.get_weights()[0], w, rtol=1e-5, atol=1e-6, msg=f"step {t}"
            )

    def test_decay_skipped_when_loss_scale_optimizer_skips(self):
        """A LossScaleOptimizer skips steps with non-finite gradients: weights stay unchanged.

        A loss scale of 2¹²⁷ overflows the scaled loss, so the first step is skipped (and the
        scale halved); the decay must be skipped with it, then resume on finite steps.
        """
        task = ArrayTask(
            self.x,
            self.y * 1e3,
            TrainerOptions(batch_size=BATCH, train_steps=1),
            model_fn=mlp,
            optimizer=lambda: keras.optimizers.LossScaleOptimizer(
                keras.optimizers.SGD(1e-9), initial_scale=2.0**127
            ),
            penalties=[DecoupledWeightDecay(0.5, coupling="absolute")],
        )
        before = task.model.get_weights()
        iterator = iter(task.train_dataset())
        task.train_loop.run(1, iterator)
        self.assertEqual(int(task.optimizer.iterations), 0)
        self.assertEqual(max_abs_diff(task.model.get_weights(), before), 0.0)
        for _ in range(20):  # the scale halves on each skipped step until gradients are finite
            task.train_loop.run(1, iterator)
        self.assertGreater(int(task.optimizer.iterations), 0)
        kernel = task.model.get_weights()[0]
        self.assertLess(np.max(np.abs(kernel)), 0.51 * np.max(np.abs(before[0])))


class RidgeTest(EquivalenceTestBase):
    """A linear model + MSE + `L2(λ)` converges to the closed-form ridge solution."""

    def test_converges_to_closed_form(self):
        """Reference: `w* = (XᵀX/n + λI)⁻¹ Xᵀy/n`, reached to ≤ 1e-4 relative error."""
        rng = np.random.RandomState(5)
        n, d, lam = 128, 5, 0.3
        x = rng.randn(n, d).astype(np.float32)
        y = (x @ rng.randn(d, 1) + 0.5 * rng.randn(n, 1)).astype(np.float32)
        task = ArrayTask(
            x,
            y,
            TrainerOptions(batch_size=n, train_steps=600, steps_per_loop=600),
            model_fn=lambda: linear(d),
            optimizer=lambda: keras.optimizers.SGD(0.2),
            penalties=[L2(lam)],
        )
        task.train()
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        expected = np.linalg.solve(x64.T @ x64 / n + lam * np.eye(d), x64.T @ y64 / n)
        got = task.model.get_weights()[0]
        self.assertLessEqual(np.linalg.norm(got - expected) / np.linalg.norm(expected), 1e-4)
        ols = np.linalg.lstsq(x64, y64, rcond=None)[0]
        self.assertGreater(np.linalg.norm(ols - expected) / np.linalg.norm(expected), 1e-2)


class NoDoubleCountingTest(EquivalenceTestBase):
    """A penalty is counted once whether it comes from Keras, a Penalty, or (deliberately) both."""

    def penalty_part(self, regularizer, penalties):
        task = ArrayTask(self.x, self.y, model_fn=lambda: mlp(regularizer), penalties=penalties)
        task.model.set_weights(self.init)
        total, data, *terms = task.compute_losses(self.x[:BATCH], self.y[:BATCH])
        self.assertAllClose(total, data + sum(terms), rtol=1e-6)
        return float(total - data)

    def test_keras_penalty_and_both(self):
        """Reference: `λ·Σ‖kernel‖²` in NumPy; both sources together give exactly twice it."""
        lam = 0.05
        expected = lam * sum(np.sum(np.square(w, dtype=np.float64)) for w in self.init[::2])
        keras_only = self.penalty_part(keras.regularizers.l2(lam), [])
        penalty_only = self.penalty_part(None, [SelectiveL2(lam, include="kernel")])
        both = self.penalty_part(keras.regularizers.l2(lam), [SelectiveL2(lam, include="kernel")])
        self.assertAllClose(keras_only, expected, rtol=1e-5)
        self.assertAllClose(penalty_only, expected, rtol=1e-5)
        self.assertAllClose(both, 2 * expected, rtol=1e-5)


class MixedPrecisionTest(EquivalenceTestBase):
    """Under `mixed_bfloat16`, penalties use the float32 weights and losses stay float32."""

    def setUp(self):
        super().setUp()
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        self.addCleanup(keras.mixed_precision.set_global_policy, "float32")

    def test_penalties_on_float32_weights(self):
        """Reference: NumPy on the float32 weights; bfloat16 weights would be off by ~1e-3."""
        task = ArrayTask(
            self.x,
            self.y,
            TrainerOptions(batch_size=BATCH, train_steps=10),
            penalties=[L2(0.05)],
            model_fn=lambda: mlp(keras.regularizers.l2(0.05)),
        )
        task.model.set_weights(self.init)
        self.assertEqual(task.model.layers[0].compute_dtype, "bfloat16")
        losses = task.compute_losses(self.x[:BATCH], self.y[:BATCH])
        self.assertEqual([t.dtype for t in losses], [tf.float32] * 4)
        weights = [w.astype(np.float64) for w in task.model.get_weights()]
        expected = 0.05 * sum(np.sum(w**2) for w in weights)
        self.assertAllClose(losses[2], expected, rtol=1e-6)
        in_bf16 = 0.05 * sum(
            np.sum(tf.cast(tf.cast(w, tf.bfloat16), tf.float64).numpy() ** 2) for w in weights
        )
        self.assertGreater(abs(in_bf16 - expected) / expected, 1e-4)
        result = task.train()
        self.assertTrue(all(np.isfinite(v) for v in result.train.values()))


if __name__ == "__main__":
    tf.test.main()
