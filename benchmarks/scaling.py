"""One device against MirroredStrategy on 2 logical CPU replicas and against 2 local workers
(MultiWorkerMirroredStrategy): the fast path and tf.data.

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/scaling.py                 # ~6 min on 2 CPU cores
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/scaling.py --rounds 3 --steps 200

Two workloads: the default task (`tasks/synthetic.py`, batch 64) and the seed MLP
(`benchmarks/workloads.py`, 784-64-10, batch 128, 8,192 random examples), each in nine variants:

- `one device`: the in-memory fast path, XLA as chosen (`jit_compile=None`: the whole loop);
- `one device, no XLA`: the same loop as a plain graph (logical CPU replicas refuse XLA);
- `a replica's half, no XLA`: one replica's share alone (half the batch, no XLA) on one device:
  the floor of a 2-replica step, whose replicas run that in parallel and then synchronize;
- `mirrored 2, in memory`: MirroredStrategy on /cpu:0 and /cpu:1, each replica gathering its
  half of the global batch inside the loop (issue 22);
- `mirrored 2, tf.data`: the same strategy fed by `experimental_distribute_dataset` (a task whose
  `train_arrays` returns None: the path every strategy took before);
- `2 workers, in memory` and `2 workers, tf.data`: two processes of this script
  (`--worker 0|1`, TF_CONFIG on 127.0.0.1), one replica each, MultiWorkerMirroredStrategy over
  gRPC; each times on the parent's command, so their rounds alternate with the others' (while
  the others run, they wait on a pipe). Worker 0's rate is reported;
- `mirrored 2, exchange only` and `2 workers, exchange only`: no model, only what a step's
  replicas exchange (an all-reduce of as many floats as the model has parameters, a reduce of
  a scalar) in the same kind of loop: the synchronization floor of a step on that strategy.

Each variant is built and warmed up (first call: tracing, compiling), then every round times each
variant once for `--steps` steps in calls of 100 (`TrainLoop.run`, the loop the controller
calls), the order alternated from round to round. Prints steps/s per round, the medians and the
median per-round ratio to `one device`. On a shared machine compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
import tensorflow as tf
from workloads import NUM_CLASSES, seed_mlp

from trainer import Trainer, TrainerOptions
from trainer.distribution import configure_cpu_replicas, make_strategy
from trainer.inputs import InMemoryBatches

CALL = 100  # steps per TrainLoop.run call


def synthetic_task(base: type) -> type:
    from tasks.synthetic import SyntheticRegression

    class Synthetic(base, SyntheticRegression):
        pass

    return Synthetic


class FastPath:
    """Mixed in first: the task's arrays as they are."""


class TfData:
    """Mixed in first: no `train_arrays`; `train_dataset` gives the same batches via tf.data."""

    def train_dataset(self) -> tf.data.Dataset:
        arrays = super().train_arrays()
        return InMemoryBatches(arrays, self.options.batch_size, self.options.seed).dataset()

    def train_arrays(self):
        return None


class SeedMlpTask(Trainer):
    """The seed MLP on 8,192 random examples, sparse cross-entropy from logits."""

    def build_model(self) -> keras.Model:
        return seed_mlp()

    def train_arrays(self):
        rng = tf.random.Generator.from_seed(0)
        x = rng.normal([8192, 784]).numpy()
        y = rng.uniform([8192], 0, NUM_CLASSES, tf.int32).numpy()
        return x, y

    def compute_loss(self, labels, outputs):
        return keras.losses.sparse_categorical_crossentropy(labels, outputs, from_logits=True)


def seed_mlp_task(base: type) -> type:
    class SeedMlp(base, SeedMlpTask):
        pass

    return SeedMlp


WORKLOADS = {"synthetic": (synthetic_task, 64), "seed_mlp": (seed_mlp_task, 128)}


class Variant:
    """One trainer and the way its loop is called."""

    def __init__(self, name: str, task_cls: type, options: TrainerOptions, strategy=None):
        self.name = name
        self.trainer = task_cls(options, strategy=strategy)
        loop = self.trainer.train_loop
        self.iterator = (
            None if loop.in_memory else iter(self.trainer.distribute(self.trainer.train_dataset()))
        )
        self.rates: list[float] = []
        start = time.perf_counter()
        loop.run(CALL, self.iterator)
        self.first_s = time.perf_counter() - start

    def time(self, steps: int) -> None:
        loop = self.trainer.train_loop
        start = time.perf_counter()
        for _ in range(steps // CALL):
            loop.run(CALL, self.iterator)
        self.rates.append(steps // CALL * CALL / (time.perf_counter() - start))


class Exchange:
    """Only what the replicas of a step exchange: one all-reduce of as many floats as the model
    has trainable parameters (its gradients) and one reduce of a scalar (its losses), in the
    same multi-step loop: the floor a step on several replicas cannot go below."""

    def __init__(self, name: str, parameters: int, strategy: tf.distribute.Strategy):
        self.name, self.rates = name, []
        total = tf.distribute.ReduceOp.SUM

        def replica(value: tf.Tensor) -> tf.Tensor:
            context = tf.distribute.get_replica_context()
            gradients = context.all_reduce(total, tf.fill([parameters], value))
            return gradients[0]

        @tf.function
        def loop(steps: tf.Tensor) -> tf.Tensor:
            def body(i, acc):  # values that change per step: nothing to fold away
                exchanged = strategy.run(replica, args=(tf.cast(i, tf.float32),))
                return i + 1, acc + strategy.reduce(total, exchanged, axis=None)

            return tf.while_loop(lambda i, _: i < steps, body, [0, 0.0])[1]

        self.loop = loop
        start = time.perf_counter()
        self.loop(tf.constant(CALL))
        self.first_s = time.perf_counter() - start

    def time(self, steps: int) -> None:
        start = time.perf_counter()
        for _ in range(steps // CALL):
            self.loop(tf.constant(CALL)).numpy()
        self.rates.append(steps // CALL * CALL / (time.perf_counter() - start))


class Workers:
    """2 local worker processes (`--worker`), each holding both variants of a workload; `time`
    runs one variant on both at once and keeps worker 0's rate."""

    def __init__(self, name: str, workload: str, steps: int, pair: Workers | None = None):
        self.name, self.rates = name, []
        if pair is not None:  # the same processes, the other variant
            self.processes = pair.processes
            return
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        self.processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--worker",
                    str(i),
                    "--ports",
                    ",".join(map(str, ports)),
                    "--workloads",
                    workload,
                    "--steps",
                    str(steps),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        for p in self.processes:
            line = p.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"a worker did not start: {line!r}")
        self.first_s = float(line.split()[1])

    def time(self, steps: int) -> None:
        del steps  # the workers were given it
        for p in self.processes:
            p.stdin.write(f"{self.name}\n")
            p.stdin.flush()
        rates = [float(p.stdout.readline()) for p in self.processes]
        self.rates.append(rates[0])

    def close(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.stdin.close()
                p.wait(timeout=60)


def worker_main(index: int, ports: str, workload: str, steps: int) -> None:
    """A worker of `Workers`: builds both variants, then times the one named on each stdin line
    and prints its steps/s."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports.split(",")]}
    os.environ["TF_CONFIG"] = json.dumps({"cluster": cluster,
                                          "task": {"type": "worker", "index": index}})  # fmt: skip
    strategy = make_strategy("multi_worker")
    make, batch = WORKLOADS[workload]
    options = TrainerOptions(batch_size=batch, steps_per_loop=CALL, train_steps=10**9)
    fast = Variant(WORKER_VARIANTS[0], make(FastPath), options, strategy)
    variants = {
        WORKER_VARIANTS[0]: fast,
        WORKER_VARIANTS[1]: Variant(WORKER_VARIANTS[1], make(TfData), options, strategy),
        WORKER_VARIANTS[2]: Exchange(WORKER_VARIANTS[2], parameters(fast), strategy),
    }
    first = max(v.first_s for v in variants.values())
    print(f"ready {first:.1f}", flush=True)
    for line in sys.stdin:
        variant = variants[line.strip()]
        variant.time(steps)
        print(variant.rates[-1], flush=True)


WORKER_VARIANTS = ("2 workers, in memory", "2 workers, tf.data", "2 workers, exchange only")


def parameters(variant: Variant) -> int:
    return sum(int(tf.size(v)) for v in variant.trainer.model.trainable_variables)


def run_workload(name: str, rounds: int, steps: int, mirrored) -> None:
    make, batch = WORKLOADS[name]
    options = TrainerOptions(batch_size=batch, steps_per_loop=CALL, train_steps=10**9)
    no_xla = TrainerOptions(batch_size=batch, steps_per_loop=CALL, train_steps=10**9,
                            jit_compile=False)  # fmt: skip
    half = TrainerOptions(batch_size=batch // 2, steps_per_loop=CALL, train_steps=10**9,
                          jit_compile=False)  # fmt: skip
    variants = [
        Variant("one device", make(FastPath), options),
        Variant("one device, no XLA", make(FastPath), no_xla),
        Variant("a replica's half, no XLA", make(FastPath), half),
        Variant("mirrored 2, in memory", make(FastPath), options, mirrored),
        Variant("mirrored 2, tf.data", make(TfData), options, mirrored),
    ]
    variants.append(Exchange("mirrored 2, exchange only", parameters(variants[0]), mirrored))
    workers = Workers(WORKER_VARIANTS[0], name, steps)
    variants += [workers] + [Workers(n, name, steps, pair=workers) for n in WORKER_VARIANTS[1:]]
    for v in variants[:5]:
        loop = v.trainer.train_loop
        print(f"[{name}] {v.name}: in_memory={loop.in_memory} xla={loop.xla} "
              f"first call {v.first_s:.1f} s")  # fmt: skip
    print(f"[{name}] 2 workers: first calls {workers.first_s:.1f} s")
    for r in range(rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            v.time(steps)
        rates = ", ".join(f"{v.name} {v.rates[-1]:.0f}" for v in variants)
        print(f"[{name}] round {r + 1}: {rates} steps/s")
    one = variants[0]
    print(f"[{name}] medians (steps/s) and median per-round ratio to one device:")
    for v in variants:
        ratio = statistics.median(a / b for a, b in zip(v.rates, one.rates, strict=True))
        rate = statistics.median(v.rates)
        print(f"  {v.name:26s} {rate:8.0f}  {1e6 / rate:6.0f} us/step  {ratio:.2f}x")
    workers.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=500, help="timed steps per round")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # Workers' processes
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker_main(args.worker, args.ports, args.workloads[0], args.steps)
        return
    configure_cpu_replicas(2)
    mirrored = make_strategy("mirrored", cpu_replicas=2)
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs")
    for name in args.workloads:
        run_workload(name, args.rounds, args.steps, mirrored)


if __name__ == "__main__":
    main()
