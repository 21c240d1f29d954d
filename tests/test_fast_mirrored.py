"""In-memory batches under MirroredStrategy: each replica gathers its slice of the step's
global batch inside the loop; weights equal to one device's, no iterator in the graph, exact
resume, and the refusal of a batch that does not split evenly."""

import json
import os
import subprocess
import sys
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from array_task import ArrayTask, free_ports, named_mlp, regression_data

from trainer import L2, ConfigError, DecoupledWeightDecay, TrainerOptions
from trainer.distribution import make_strategy
from trainer.inputs import InMemoryBatches

FIXTURES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_TIMEOUT_S = 120  # a worker whose peer is missing hangs for minutes otherwise
BATCH, STEPS = 16, 50
# Penalties, decoupled decay, clipping and accumulation on; loops of 8 steps cross a call.
OPTIONS = {"batch_size": BATCH, "train_steps": STEPS, "steps_per_loop": 8,
           "clip_global_norm": 0.5, "accumulate_steps": 2, "seed": 3}  # fmt: skip


class MemoryTask(ArrayTask):
    """ArrayTask with its data in memory: batches gathered in-graph, shuffled by `seed`."""

    def train_arrays(self):
        return self.x, self.y


def relative_diff(a: np.ndarray, b: np.ndarray) -> float:
    """The largest difference relative to the largest magnitude of `b`."""
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(np.float32).tiny))


def all_ops(function) -> list[str]:
    """The op types of a concrete function's graph and of every function in its library."""
    graph_def = function.graph.as_graph_def()
    ops = [node.op for node in graph_def.node]
    for library_function in graph_def.library.function:
        ops += [node.op for node in library_function.node_def]
    return ops


class FastMirroredTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.x, cls.y = regression_data(n=80)  # 5 steps an epoch: 50 steps reshuffle 9 times
        keras.utils.set_random_seed(1)
        cls.init = named_mlp().get_weights()
        cls.mirrored = make_strategy("mirrored", cpu_replicas=2)

    def make(self, strategy=None, penalties=None, **options):
        penalties = penalties if penalties is not None else [
            L2(1e-2, include="kernel"), DecoupledWeightDecay(0.05)
        ]  # fmt: skip
        task = MemoryTask(self.x, self.y, TrainerOptions(**{**OPTIONS, **options}),
                          model_fn=named_mlp, optimizer=lambda: keras.optimizers.Adam(0.01),
                          penalties=penalties, strategy=strategy)  # fmt: skip
        task.model.set_weights(self.init)
        return task

    def test_two_replicas_in_memory_match_one_device(self):
        """50 Adam steps with L2, decoupled decay, clipping and 2 micro-batches: MirroredStrategy
        on 2 logical CPUs, in memory ≡ one device (whose loop is XLA-compiled), ≤ 1e-6
        relative per tensor; both moved away from the start."""
        one = self.one_device_weights()
        two = self.make(self.mirrored)
        two.train()
        self.assertTrue(two.train_loop.in_memory)
        self.assertFalse(two.train_loop.xla)
        for a, b in zip(two.model.get_weights(), one, strict=True):
            self.assertLess(relative_diff(a, b), 1e-6)
        self.assertGreater(relative_diff(one[0], self.init[0]), 1e-3)

    def one_device_weights(self) -> list[np.ndarray]:
        """The weights after `OPTIONS`' steps on one device (trained once per class)."""
        if not hasattr(type(self), "_one_device"):
            one = self.make()
            one.train()
            type(self)._one_device = one.model.get_weights()
        return type(self)._one_device

    def test_replica_copies_of_the_arrays_are_each_replicas_own(self):
        """`replicate_over` (made for XLA per replica on GPUs): a copy of the arrays on each
        replica's device, and each replica's gather returns its indices' examples (≡ NumPy)."""
        batches = InMemoryBatches((self.x, self.y), BATCH, 0, replicate_over=self.mirrored)
        devices = list(self.mirrored.extended.worker_devices)
        for array in batches.arrays:
            self.assertEqual([v.device for v in array.values], devices)
        chosen = [3, 70, 12, 5]
        gathered = self.mirrored.run(tf.function(batches.gather), args=(tf.constant(chosen),))
        local = self.mirrored.experimental_local_results(gathered)
        self.assertLen(local, 2)
        for x, y in local:
            self.assertAllEqual(x, self.x[chosen])
            self.assertAllEqual(y, self.y[chosen])

    def test_xla_per_replica_that_cannot_compile_falls_back(self):
        """XLA per replica chosen automatically (as on GPUs; forced here) on logical CPU
        replicas, which XLA all runs on /cpu:0, so the copy on /cpu:1 cannot be read: one
        warning, the step runs without XLA, and the weights are one device's (≤ 1e-6)."""
        two = self.make(self.mirrored)
        with mock.patch("trainer.step.loop.replica_jit_compile", return_value=True):
            self.assertTrue(two.train_loop.in_memory)
        with self.assertLogs("absl", level="WARNING") as logs:
            two.train()
        self.assertIn("XLA could not compile the train step of each replica", logs.output[0])
        for a, b in zip(two.model.get_weights(), self.one_device_weights(), strict=True):
            self.assertLess(relative_diff(a, b), 1e-6)

    def test_the_mirrored_loop_has_no_iterator(self):
        """Under the strategy the loop gathers in-graph: no iterator op anywhere in the traced
        loop (its functions included), and no iterator to pass; one call runs many steps."""
        task = self.make(self.mirrored)
        self.assertTrue(task.train_loop.in_memory)
        ops = all_ops(task.train_loop.concrete_function())
        self.assertNotIn("IteratorGetNext", ops)
        self.assertNotIn("IteratorGetNextAsOptional", ops)
        self.assertIn("ResourceGather", ops)
        _, step = task.train_loop.run(6)
        self.assertEqual(step, 6)

    def test_mirrored_resume_is_bit_identical(self):
        """deterministic=True under the strategy, in memory: 25 steps, stop, resume to 50 ≡ 50
        steps straight, bit for bit."""
        options = {"deterministic": True, "steps_per_loop": 5}
        straight = self.make(self.mirrored, **options)
        straight.train()
        model_dir = self.create_tempdir().full_path
        options.update(model_dir=model_dir, checkpoint_every=STEPS // 2)
        self.make(self.mirrored, **{**options, "train_steps": STEPS // 2}).train()
        resumed = self.make(self.mirrored, **options)
        resumed.train()
        self.assertEqual(resumed.step, STEPS)
        for got, want in zip(resumed.model.get_weights(), straight.model.get_weights(),
                             strict=True):  # fmt: skip
            self.assertAllEqual(got, want)

    def test_a_batch_that_does_not_split_over_the_replicas_is_refused(self):
        task = self.make(self.mirrored, batch_size=15, accumulate_steps=1)
        with self.assertRaisesRegex(ConfigError, r"^`batch_size` \(15\) must divide by the 2 "):
            task.train_loop  # noqa: B018
        message = ""
        try:
            task.train_loop  # noqa: B018
        except ConfigError as e:
            message = str(e)
        self.assertNotIn("\n", message)


class TwoWorkersTest(tf.test.TestCase):
    """2 worker processes (MultiWorkerMirroredStrategy, TF_CONFIG on 127.0.0.1)."""

    FLAGS = ("--train_steps=50", "--steps_per_loop=8", "--clip_global_norm=0.5",
             "--accumulate_steps=2", "--penalty=l2(1e-3, include='kernel')",
             "--penalty=decoupled_weight_decay(0.05)")  # fmt: skip

    def start_worker(self, out, ports, index, task):
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
               "PYTHONPATH": os.pathsep.join([FIXTURES_DIR, os.environ.get("PYTHONPATH", "")]),
               "DIST_WEIGHTS_OUT": os.path.join(out, f"worker{index}.npz"),
               "TF_CONFIG": json.dumps({"cluster": cluster,
                                        "task": {"type": "worker", "index": index}})}  # fmt: skip
        command = [sys.executable, "-m", "trainer", "--import=memory_plugin", f"--task={task}",
                   "--strategy=multi_worker", f"--model_dir={os.path.join(out, f'run{index}')}",
                   *self.FLAGS]  # fmt: skip
        log = open(os.path.join(out, f"worker{index}.log"), "w")
        self.addCleanup(log.close)
        return subprocess.Popen(command, cwd=REPO_DIR, env=env, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip

    def train_on_two_workers(self, task_cls, task):
        """`task` on 2 worker processes with `FLAGS`, and `task_cls` with the same settings on
        one device in this process; asserts both workers' weights are one device's (≤ 1e-6
        relative per tensor) and returns the workers' logs."""
        out = self.create_tempdir().full_path
        ports = free_ports(2)
        workers = [self.start_worker(out, ports, i, task) for i in range(2)]
        options = task_cls.make_options(
            train_steps=50, steps_per_loop=8, clip_global_norm=0.5, accumulate_steps=2
        )
        one = task_cls(options, penalties=[L2(1e-3, include="kernel"), DecoupledWeightDecay(0.05)])
        one.train()
        logs = []
        for i, worker in enumerate(workers):
            try:
                rc = worker.wait(timeout=WORKER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                worker.kill()  # SIGKILL: a worker whose peer is gone ignores SIGTERM
                worker.wait()
                rc = "timeout"
            with open(os.path.join(out, f"worker{i}.log")) as f:
                logs.append(f.read())
            self.assertEqual(rc, 0, msg=f"worker {i} exited {rc}:\n{logs[-1][-3000:]}")
            self.assertIn("with 2 replica(s)", logs[-1])
            with np.load(os.path.join(out, f"worker{i}.npz")) as saved:
                got = [saved[f"arr_{k}"] for k in range(len(saved.files))]
            for a, b in zip(got, one.model.get_weights(), strict=True):
                self.assertLess(relative_diff(a, b), 1e-6)
        with open(os.path.join(out, "run0", "results.json")) as f:
            self.wait_share = json.load(f).get("input_wait_share")
        return logs

    def test_two_workers_in_memory_match_one_device(self):
        """50 steps with an L2 penalty, a Keras L2 regularizer, decoupled decay, clipping and
        2 micro-batches on 2 workers (each its replica's half of every global batch, gathered
        in memory) ≡ the same task on one device in this process: ≤ 1e-6 relative per
        tensor. The chief's results show no input wait: there is no iterator."""
        from memory_plugin import DistMemory

        self.train_on_two_workers(DistMemory, "dist_memory")
        self.assertIsNone(self.wait_share)

    def test_two_workers_with_input_per_worker_match_one_device(self):
        """The same on the `tf.data` path built per worker: each worker builds its own
        dataset from its input context (pipelines 0 and 1 of 2) and takes its replica's
        slices of the one-device global batches (`per_replica_batches`): ≤ 1e-6 of one
        device."""
        from memory_plugin import DistPerWorker

        logs = self.train_on_two_workers(DistPerWorker, "dist_per_worker")
        for i, log in enumerate(logs):
            self.assertIn(f"input pipeline {i} of 2", log)


if __name__ == "__main__":
    tf.test.main()
