"""One device against MirroredStrategy on 2 logical CPU replicas: the fast path and tf.data.

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/scaling.py                 # ~2 min on 2 CPU cores
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/scaling.py --rounds 3 --steps 200

Two workloads: the default task (`tasks/synthetic.py`, batch 64) and the seed MLP
(`benchmarks/workloads.py`, 784-64-10, batch 128, 8,192 random examples), each in five variants:

- `one device`: the in-memory fast path, XLA as chosen (`jit_compile=None`: the whole loop);
- `one device, no XLA`: the same loop as a plain graph (logical CPU replicas refuse XLA);
- `a replica's half, no XLA`: one replica's share alone (half the batch, no XLA) on one device:
  the floor of a 2-replica step, whose replicas run that in parallel and then synchronize;
- `mirrored 2, in memory`: MirroredStrategy on /cpu:0 and /cpu:1, each replica gathering its
  half of the global batch inside the loop (issue 22);
- `mirrored 2, tf.data`: the same strategy fed by `experimental_distribute_dataset` (a task whose
  `train_arrays` returns None: the path every strategy took before).

Each variant is built and warmed up (first call: tracing, compiling), then every round times each
variant once for `--steps` steps in calls of 100 (`TrainLoop.run`, the loop the controller
calls), the order alternated from round to round. Prints steps/s per round, the medians and the
median per-round ratio to `one device`. On a shared machine compare ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    for v in variants:
        loop = v.trainer.train_loop
        print(f"[{name}] {v.name}: in_memory={loop.in_memory} xla={loop.xla} "
              f"first call {v.first_s:.1f} s")  # fmt: skip
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=500, help="timed steps per round")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    args = parser.parse_args()
    configure_cpu_replicas(2)
    mirrored = make_strategy("mirrored", cpu_replicas=2)
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs")
    for name in args.workloads:
        run_workload(name, args.rounds, args.steps, mirrored)


if __name__ == "__main__":
    main()
