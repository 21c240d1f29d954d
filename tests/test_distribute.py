"""tf.distribute: the same weights on 1 device, 2 mirrored replicas and 2 worker processes."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from array_task import ArrayTask, free_ports, regression_data
from dist_plugin import mlp

from trainer import L2, ConfigError, DecoupledWeightDecay, SelectiveL2, TrainerOptions
from trainer.distribution import make_strategy

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
FIXTURES_DIR = os.path.join(TESTS_DIR, "fixtures")
REPO_DIR = os.path.dirname(TESTS_DIR)
WORKER_TIMEOUT_S = 240  # a worker whose peer is missing hangs for minutes otherwise


class UnscaledL2(L2):
    """A deliberately wrong L2: multiplied back by the replica count, so it counts once per
    replica, the classic `tf.distribute` bug (`tf.nn.scale_regularization_loss` forgotten)."""

    def loss(self, variables):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return super().loss(variables) * replicas


def penalties(l2_class=L2):
    return [
        l2_class(1e-2),
        SelectiveL2(2e-2, include="kernel"),
        DecoupledWeightDecay(0.05),
    ]


class MirroredTest(parameterized.TestCase, tf.test.TestCase):
    """2 logical CPUs under MirroredStrategy ≡ one device with the same global batch."""

    def setUp(self):
        super().setUp()
        keras.utils.set_random_seed(3)
        self.init = mlp().get_weights()

    def train(self, strategy, make_optimizer, l2_class=L2):
        x, y = regression_data(n=64)
        task = ArrayTask(
            x,
            y,
            TrainerOptions(batch_size=16, train_steps=20, steps_per_loop=5),
            model_fn=mlp,
            optimizer=make_optimizer,
            penalties=penalties(l2_class),
            strategy=strategy,
        )
        task.model.set_weights(self.init)
        result = task.train()
        return task.model.get_weights(), result

    @parameterized.named_parameters(
        ("sgd", lambda: keras.optimizers.SGD(0.1)),
        ("adam", lambda: keras.optimizers.Adam(0.01)),
    )
    def test_two_replicas_match_one_device(self, make_optimizer):
        """20 steps with L2, SelectiveL2, decoupled decay and a Keras regularizer: ≤ 1e-5.

        A penalty left unscaled by the replica count lands measurably elsewhere.
        """
        mirrored = make_strategy("mirrored", cpu_replicas=2)
        self.assertEqual(mirrored.num_replicas_in_sync, 2)
        single, single_result = self.train(tf.distribute.get_strategy(), make_optimizer)
        replicated, replicated_result = self.train(mirrored, make_optimizer)
        for a, b in zip(single, replicated):
            self.assertAllClose(a, b, atol=1e-5, rtol=0)
        for name, value in single_result.train.items():
            self.assertAllClose(replicated_result.train[name], value, rtol=1e-5, msg=name)
        unscaled, _ = self.train(mirrored, make_optimizer, UnscaledL2)
        self.assertGreater(max(np.max(np.abs(a - b)) for a, b in zip(single, unscaled)), 1e-3)
        # ...while on one replica the same class lands within a few float32 ulps: the
        # difference is the scaling. Not bit-exact: the extra `* 1` changes the graph, and with
        # it the order in which Grappler and oneDNN reduce (1 ulp apart on AVX-512 machines).
        one, _ = self.train(tf.distribute.get_strategy(), make_optimizer, UnscaledL2)
        for a, b in zip(single, one):
            self.assertAllClose(a, b, atol=1e-6, rtol=1e-6)

    def test_strategy_options_are_validated(self):
        with self.assertRaisesRegex(ConfigError, r"`strategy` \('mirror'\)"):
            TrainerOptions(strategy="mirror")
        with self.assertRaisesRegex(ConfigError, r"`cpu_replicas` \(2\) needs strategy 'mirrored'"):
            make_strategy("default", cpu_replicas=2)
        with self.assertRaisesRegex(ConfigError, r"`cpu_replicas` \(8\): TensorFlow already"):
            make_strategy("mirrored", cpu_replicas=8)


class MultiWorkerTest(tf.test.TestCase):
    """2 worker processes (MultiWorkerMirroredStrategy, TF_CONFIG on 127.0.0.1) ≡ 1 process."""

    def run_cli(self, out_dir, name, extra_env, flags):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([FIXTURES_DIR, os.environ.get("PYTHONPATH", "")]),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "DIST_WEIGHTS_OUT": os.path.join(out_dir, f"{name}.npz"),
            **extra_env,
        }
        command = [
            *(sys.executable, "-m", "trainer", "--import=dist_plugin", "--task=dist_regression"),
            f"--model_dir={os.path.join(out_dir, name)}",
            *flags,
        ]
        log = open(os.path.join(out_dir, f"{name}.log"), "w")
        self.addCleanup(log.close)
        return subprocess.Popen(
            command, cwd=REPO_DIR, env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def wait(self, process, out_dir, name):
        try:
            rc = process.wait(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()  # SIGKILL: TF's own SIGTERM handler can ignore a polite stop
            process.wait()
            rc = "timeout"
        with open(os.path.join(out_dir, f"{name}.log")) as f:
            log = f.read()
        self.assertEqual(rc, 0, msg=f"{name} exited {rc}:\n{log[-3000:]}")
        replicas = 1 if name == "single" else 2
        self.assertIn(f"with {replicas} replica(s)", log)
        with np.load(os.path.join(out_dir, f"{name}.npz")) as weights:
            return [weights[k] for k in sorted(weights.files, key=lambda k: int(k.split("_")[1]))]

    def test_two_workers_match_one_process(self):
        out_dir = self.create_tempdir().full_path
        ports = free_ports(2)
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        workers = [
            self.run_cli(
                out_dir,
                f"worker{i}",
                {
                    "TF_CONFIG": json.dumps(
                        {"cluster": cluster, "task": {"type": "worker", "index": i}}
                    )
                },
                ["--strategy=multi_worker"],
            )
            for i in range(2)
        ]
        single = self.run_cli(out_dir, "single", {}, [])
        results = [
            self.wait(p, out_dir, n)
            for p, n in zip([*workers, single], ["worker0", "worker1", "single"])
        ]
        for worker in results[:2]:
            for a, b in zip(worker, results[2]):
                self.assertAllClose(a, b, atol=1e-5, rtol=0)
        # Only the chief (worker 0) writes results.
        self.assertTrue(os.path.exists(os.path.join(out_dir, "worker0", "results.json")))
        self.assertFalse(os.path.exists(os.path.join(out_dir, "worker1", "results.json")))


if __name__ == "__main__":
    tf.test.main()


class PrecisionAndXlaTest(parameterized.TestCase, tf.test.TestCase):
    """`mixed_precision` and `jit_compile` options, alone and under MirroredStrategy."""

    def make_task(self, strategy=None, **options):
        x, y = regression_data(n=64)
        options = {"batch_size": 16, "train_steps": 10, "steps_per_loop": 5, **options}
        return ArrayTask(
            x, y, TrainerOptions(**options), model_fn=mlp, penalties=penalties(), strategy=strategy
        )

    def test_jit_compile_matches_graph_mode(self):
        """XLA-compiled steps end with the weights of the plain graph (≤ 1e-5)."""
        plain, compiled = self.make_task(), self.make_task(jit_compile=True)
        compiled.model.set_weights(plain.model.get_weights())
        plain.train()
        compiled.train()
        for a, b in zip(plain.model.get_weights(), compiled.model.get_weights()):
            self.assertAllClose(a, b, atol=1e-5, rtol=0)

    def test_jit_compile_refused_on_logical_cpu_replicas(self):
        """XLA would run every logical-CPU replica on /cpu:0 (variables on /cpu:1 fail)."""
        with self.assertRaisesRegex(ConfigError, r"`jit_compile` \(True\) cannot run 2 replicas"):
            self.make_task(make_strategy("mirrored", cpu_replicas=2), jit_compile=True)

    def test_mixed_bfloat16(self):
        """bfloat16 compute, float32 weights and loss terms; the global policy is restored."""
        task = self.make_task(mixed_precision="mixed_bfloat16")
        self.assertEqual(task.model.layers[0].compute_dtype, "bfloat16")
        self.assertEqual(task.model.layers[0].kernel.dtype, "float32")
        self.assertEqual(keras.mixed_precision.global_policy().name, "float32")
        self.assertNotIsInstance(task.optimizer, keras.optimizers.LossScaleOptimizer)
        result = task.train()
        self.assertTrue(all(np.isfinite(v) for v in result.train.values()))

    def test_mixed_float16_adds_loss_scaling(self):
        """float16 needs a LossScaleOptimizer (Keras 3 `scale_loss` in the step); it trains."""
        task = self.make_task(mixed_precision="mixed_float16", train_steps=4, steps_per_loop=2)
        task.build()
        self.assertIsInstance(task.optimizer, keras.optimizers.LossScaleOptimizer)
        before = task.compute_losses(task.x, task.y)[1]
        result = task.train()
        self.assertLess(result.train["data_loss"], float(before) * 1.5)
        self.assertTrue(all(np.isfinite(v) for v in result.train.values()))
