"""Issue 20's regularizers all at once: SAM, SWA, a strength schedule and a per-group learning
rate, with accumulation, clipping, decoupled decay and a projection. Each is proven alone in its
own file; here they must compose: a resumed run is bit-identical to an uninterrupted one, and two
replicas take one device's steps."""

import numpy as np
import tensorflow as tf
from array_task import ArrayTask, regression_data

from trainer import DecoupledWeightDecay, LrMultiplier, MaxNorm, SelectiveL2
from trainer.distribution import make_strategy
from trainer.step.swa import StochasticWeightAverage

STEPS = 8
OPTIONS = {
    "batch_size": 16, "learning_rate": 0.05, "train_steps": STEPS, "sam_rho": 0.05,
    "swa_start": 2, "swa_every": 2, "accumulate_steps": 2, "clip_global_norm": 1.0,
    "deterministic": True, "summary_every": 0,
}  # fmt: skip


class InMemory(ArrayTask):
    """ArrayTask with its data in memory: batches gathered in the loop, also per replica."""

    def train_arrays(self):
        return self.x, self.y


def make(strategy=None, cls=ArrayTask, **overrides) -> ArrayTask:
    x, y = regression_data()
    return cls(
        x,
        y,
        ArrayTask.make_options(**{**OPTIONS, **overrides}),
        penalties=[
            SelectiveL2(1e-2, exclude="bias", schedule=f"cosine(end=1e-3, steps={STEPS})"),
            DecoupledWeightDecay(1e-2, include="out/kernel"),
            MaxNorm(0.5, include="hidden/kernel"),
        ],
        param_groups=[LrMultiplier(0.1, include="hidden/")],
        strategy=strategy,
    )


def state(task: ArrayTask) -> list[np.ndarray]:
    """The raw weights, the SWA average (as evaluated), and every optimizer variable."""
    raw = [v.numpy() for v in task.model.trainable_variables]
    with task.evaluated_weights():
        averaged = [v.numpy() for v in task.model.trainable_variables]
    return raw + averaged + [v.numpy() for v in task.optimizer.variables]


class AllTogetherTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.straight = make()
        cls.straight.train()
        cls.want = state(cls.straight)

    def test_all_regularizers_are_in_the_step_in_order(self):
        line = self.straight.built.chain.describe()
        self.assertRegex(
            line,
            r"^schedules \(selective_l2\.scale: cosine.*\) -> gradients \(accumulate_steps=2\) -> "
            r"sam_rho=0\.05 -> clip_global_norm=1 -> decoupled_weight_decay -> apply_gradients "
            r"-> lr×0\.1 .* -> max_norm -> swa from step 2 every 2",
        )
        # The schedule ran: the strength in force is the cosine's at the last step, not 1e-2.
        want = 1e-3 + (1e-2 - 1e-3) * 0.5 * (1 + np.cos(np.pi * (STEPS - 1) / STEPS))
        scale = self.straight.penalties[0].strength("scale").numpy()
        self.assertAllClose(scale, want, rtol=1e-6)
        # SWA took its snapshots after steps 4, 6 and 8, so the average is not the raw weights.
        self.assertEqual(
            int(self.straight.built.chain.stage(StochasticWeightAverage).count.numpy()), 3
        )
        n = len(self.straight.model.trainable_variables)
        raw, averaged = self.want[:n], self.want[n : 2 * n]
        self.assertGreater(max(np.abs(r - a).max() for r, a in zip(raw, averaged)), 1e-4)

    def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(self):
        model_dir = self.create_tempdir().full_path
        # Stopped after a snapshot; the schedule's `steps` is explicit, so its curve is the same.
        make(model_dir=model_dir, train_steps=STEPS // 2 + 1).train()
        resumed = make(model_dir=model_dir)
        resumed.train()
        self.assertEqual(resumed.step, STEPS)
        for got, want in zip(state(resumed), self.want, strict=True):
            self.assertAllEqual(got, want)

    def test_two_replicas_take_one_devices_steps(self):
        mirrored = make(strategy=make_strategy("mirrored", cpu_replicas=2))
        mirrored.train()
        for got, want in zip(state(mirrored), self.want, strict=True):
            self.assertAllClose(got, want, rtol=1e-6, atol=1e-7)

    def test_two_replicas_in_memory_take_one_devices_steps(self):
        """All of them with in-memory batches, each replica gathering its half of the global
        batch in the loop (SAM's second pass and the accumulation's micro-batches included):
        ≡ one device in memory."""
        one = make(cls=InMemory)
        one.train()
        mirrored = make(strategy=make_strategy("mirrored", cpu_replicas=2), cls=InMemory)
        mirrored.train()
        self.assertTrue(mirrored.train_loop.in_memory)
        for got, want in zip(state(mirrored), state(one), strict=True):
            self.assertAllClose(got, want, rtol=1e-6, atol=1e-7)


class SkippedStepTest(tf.test.TestCase):
    def test_a_step_the_loss_scale_optimizer_skips_changes_nothing(self):
        """mixed_float16, after an applied step (SWA took its first snapshot): with the loss
        scale raised to 2¹²⁷ the next steps overflow and are skipped; each leaves the weights,
        the SWA average and its count, and the scheduled strength (a function of the optimizer's
        steps) as they were, bit for bit."""
        task = make(mixed_precision="mixed_float16", swa_start=0, swa_every=1, deterministic=False)
        swa = task.built.chain.stage(StochasticWeightAverage)
        strength = task.penalties[0].strength("scale")
        iterator = iter(task.train_dataset())
        while int(task.optimizer.iterations) == 0:
            task.train_loop.run(1, iterator)
        self.assertEqual(int(swa.count.numpy()), 1)
        state = lambda: [v.numpy() for v in [*task.model.variables, *swa.state_variables()]]  # noqa: E731
        before = state()
        task.optimizer.dynamic_scale.assign(2.0**127)  # gradients times 2¹²⁷ overflow
        # Each attempt at the second step uses the schedule's value at step 1.
        at_step_1 = 1e-3 + (1e-2 - 1e-3) * 0.5 * (1 + np.cos(np.pi / STEPS))
        for _ in range(3):  # the scale halves at each skipped step
            task.train_loop.run(1, iterator)
            self.assertEqual(int(task.optimizer.iterations), 1)
            for got, want in zip(state(), before, strict=True):
                self.assertAllEqual(got, want)
            self.assertAllClose(strength.numpy(), at_step_1, rtol=1e-6)


if __name__ == "__main__":
    tf.test.main()
