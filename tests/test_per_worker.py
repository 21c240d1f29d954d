"""Issue 22: the tf.data path per worker (`distribute_datasets_from_function`), the per-replica
XLA choice, and the GPU benchmark's smoke run."""

import importlib.util
import os

import keras
import numpy as np
import tensorflow as tf
from array_task import ArrayTask, regression_data

from trainer import TrainerOptions, per_replica_batches
from trainer.distribution import make_strategy, replica_jit_compile

BATCH, STEPS = 8, 6


def relative_diff(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


class ContextTask(ArrayTask):
    """ArrayTask whose `train_dataset` takes the input context and records each one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.contexts, self.ignore_context = [], False

    def train_dataset(self, input_context=None):
        self.contexts.append(input_context)
        dataset = super().train_dataset()
        if input_context is None or self.ignore_context:  # the latter, a wrong variant
            return dataset
        return per_replica_batches(dataset, input_context)


class PerWorkerTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.x, cls.y = regression_data(n=32)
        # Shuffled rows, so that a different split of a batch changes the weights.
        keras.utils.set_random_seed(3)
        cls.init = ArrayTask(cls.x, cls.y, TrainerOptions(batch_size=BATCH)).model.get_weights()
        cls.mirrored = make_strategy("mirrored", cpu_replicas=2)

    def make(self, cls=ContextTask, strategy=None, steps=STEPS, **options):
        options = {"batch_size": BATCH, "train_steps": steps, "steps_per_loop": 3, **options}
        optimizer = lambda: keras.optimizers.SGD(0.1)  # noqa: E731
        task = cls(self.x, self.y, TrainerOptions(**options), strategy=strategy,
                   optimizer=optimizer)  # fmt: skip
        task.model.set_weights(self.init)
        return task

    def one_device(self):
        if not hasattr(type(self), "_one"):
            task = self.make()
            task.train()
            type(self)._one = task.model.get_weights()
        return type(self)._one

    def test_mirrored_builds_per_worker_datasets_and_matches_one_device(self):
        """(a) MirroredStrategy(2): `train_dataset` gets an InputContext (1 pipeline, per-replica
        batch B/2); the weights after 6 SGD steps equal one device's within 1e-6 relative."""
        task = self.make(strategy=self.mirrored)
        task.train()
        contexts = [c for c in task.contexts if c is not None]
        self.assertNotEmpty(contexts)
        self.assertIsInstance(contexts[0], tf.distribute.InputContext)
        self.assertEqual(contexts[0].num_input_pipelines, 1)
        self.assertEqual(contexts[0].num_replicas_in_sync, 2)
        self.assertEqual(contexts[0].get_per_replica_batch_size(BATCH), BATCH // 2)
        for got, want in zip(task.model.get_weights(), self.one_device(), strict=True):
            self.assertLess(relative_diff(got, want), 1e-6)

    def test_per_replica_batches_are_contiguous_slices_of_the_global_batch(self):
        """`per_replica_batches` against NumPy: pipeline 1 of 2, 2 replicas each, global 8:
        batches are rows [4:6], [6:8] of each global batch, then [12:14], ..."""
        x = np.arange(32, dtype=np.float32)[:, None]
        dataset = tf.data.Dataset.from_tensor_slices((x, x)).batch(8, drop_remainder=True)
        context = tf.distribute.InputContext(2, 1, 4)
        got = [f.numpy()[:, 0] for f, _ in per_replica_batches(dataset, context).take(4)]
        want = [x[s : s + 2, 0] for s in (4, 6, 12, 14)]
        for g, w in zip(got, want, strict=True):
            self.assertAllEqual(g, w)

    def test_a_train_dataset_without_context_still_trains_under_the_strategy(self):
        """(b) `train_dataset(self)` (no context): today's auto-sharded path, the same weights
        as one device within 1e-6."""
        task = self.make(cls=ArrayTask, strategy=self.mirrored)
        task.train()
        for got, want in zip(task.model.get_weights(), self.one_device(), strict=True):
            self.assertLess(relative_diff(got, want), 1e-6)

    def test_mirrored_resume_is_bit_identical(self):
        """(c) deterministic, MirroredStrategy(2), tf.data per worker: 3 steps, stop, resume to 6
        ≡ 6 steps straight, bit for bit (each shard skips 3 steps' per-replica batches)."""
        options = {"deterministic": True, "checkpoint_every": 3}
        straight = self.make(strategy=self.mirrored, **options)
        straight.train()
        model_dir = self.create_tempdir().full_path
        self.make(strategy=self.mirrored, steps=3, model_dir=model_dir, **options).train()
        resumed = self.make(strategy=self.mirrored, model_dir=model_dir, **options)
        resumed.train()
        self.assertEqual(int(resumed.optimizer.iterations.numpy()), STEPS)
        for got, want in zip(resumed.model.get_weights(), straight.model.get_weights()):
            self.assertAllEqual(got, want)

    def test_replica_jit_compile_decision(self):
        """(d) XLA per replica: automatic on GPU replicas only; explicit settings win."""
        gpus = ("/job:localhost/replica:0/task:0/device:GPU:0", "/device:GPU:1")
        cpus = ("/job:localhost/replica:0/task:0/device:CPU:0", "/device:CPU:1")
        self.assertTrue(replica_jit_compile(None, gpus))
        self.assertTrue(replica_jit_compile(None, gpus[:1]))
        self.assertFalse(replica_jit_compile(None, cpus))
        self.assertFalse(replica_jit_compile(None, (gpus[0], cpus[0])))
        self.assertFalse(replica_jit_compile(None, ()))  # one device: the loop decides
        self.assertFalse(replica_jit_compile(False, gpus))
        self.assertTrue(replica_jit_compile(True, ()))


if __name__ == "__main__":
    tf.test.main()


class GpuScalingSmokeTest(tf.test.TestCase):
    def test_gpu_scaling_smoke_runs_on_cpu(self):
        """(e) `benchmarks/gpu_scaling.py --smoke` in-process: exit 0, one rate line per variant
        (1 device and the 2 logical CPUs, tapeloop and fit) and the ratios."""
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")
        spec = importlib.util.spec_from_file_location(
            "gpu_scaling", os.path.join(path, "gpu_scaling.py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        lines = []
        self.assertEqual(module.main(["--smoke"], print_fn=lines.append), 0)
        text = "\n".join(lines)
        for name in ("tapeloop_1", "fit_1", "tapeloop_N", "fit_N"):
            self.assertRegex(text, rf"{name} +[0-9.]+ steps/s")
        self.assertIn("tapeloop: 2 replicas vs one", text)
        self.assertIn("tapeloop vs fit, N replica(s)", text)
