"""GPU scaling: tapeloop on 1 GPU vs all GPUs (MirroredStrategy), against `model.fit`.

Usage (from the repository root, with the project installed, on a machine with GPUs):

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/gpu_scaling.py             # ~1-2 min
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/gpu_scaling.py --rounds 5 --width 8192
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/gpu_scaling.py --smoke     # tiny, on CPU

A compute-bound model (an MLP of `--depth` hidden layers of `--width` units, 1024 inputs, 10
classes) on random in-memory data, mixed precision (`mixed_float16`, with a loss scale) and
XLA. Weak scaling: each replica takes `--batch` examples per step, so N replicas train on
N·batch per step. Variants, each built and warmed up (tracing, compiling) before timing:

  tapeloop_1  a `Trainer` with `train_arrays` on one GPU (the default strategy): in-memory
              batches, the multi-step loop one XLA computation
  tapeloop_N  the same under `MirroredStrategy` over all GPUs (XLA per replica on GPUs)
  fit_1       `model.fit` with the same model, optimizer (Adam) and loss on one GPU,
              `jit_compile=True`, `steps_per_execution` = the steps per call
  fit_N       `fit` under the same `MirroredStrategy`

Rounds alternate the variant order; each times `--steps` steps per variant. Prints steps/s and
examples/s (medians over rounds), then the ratios: N replicas vs one (target ≥ 0.9·N in
examples/s) and tapeloop vs fit at equal replicas.

Without a GPU it prints so and exits 0. `--smoke` runs tiny sizes on the CPU (float32; "all"
are the logical CPU devices if any were configured, else one device, and no XLA per replica),
to test that the script works, not to measure.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from trainer import Trainer, TrainerOptions
from trainer.distribution import make_strategy

INPUTS, CLASSES = 1024, 10


def build_mlp(width: int, depth: int) -> keras.Model:
    """`depth` Dense(width, relu) layers on 1024 inputs, 10 float32 logits."""
    layers = [keras.Input((INPUTS,))]
    layers += [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
    layers += [keras.layers.Dense(CLASSES), keras.layers.Activation("linear", dtype="float32")]
    return keras.Sequential(layers)


def random_data(examples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    x = rng.randn(examples, INPUTS).astype(np.float32)
    return x, rng.randint(0, CLASSES, size=examples).astype(np.int32)


class ScalingTask(Trainer):
    """The MLP on the random arrays, sparse cross-entropy from logits, no evaluation."""

    def __init__(self, arrays, width: int, depth: int, options: TrainerOptions, strategy=None):
        self.arrays, self.width, self.depth = arrays, width, depth
        super().__init__(options, strategy=strategy)

    def build_model(self) -> keras.Model:
        return build_mlp(self.width, self.depth)

    def train_arrays(self):
        return self.arrays

    def compute_loss(self, labels, outputs):
        return keras.losses.sparse_categorical_crossentropy(labels, outputs, from_logits=True)


class Tapeloop:
    """`train()` continued by `steps` steps per call."""

    def __init__(self, args, arrays, replicas: int, strategy, gpu: bool):
        options = TrainerOptions(
            batch_size=args.batch * replicas,
            train_steps=1,
            steps_per_loop=args.steps,
            learning_rate=1e-3,
            mixed_precision="mixed_float16" if gpu else None,
            jit_compile=None,  # automatic: XLA on GPUs, per replica under the strategy
        )
        self.trainer = ScalingTask(arrays, args.width, args.depth, options, strategy)

    def run(self, steps: int) -> None:
        t = self.trainer
        t.options = dataclasses.replace(t.options, train_steps=t.step + steps)
        t.train()


class Fit:
    """`model.fit` on the same arrays, `steps` steps per call."""

    def __init__(self, args, arrays, replicas: int, strategy, gpu: bool, steps_per_execution=None):
        self.steps_per_execution = steps_per_execution or args.steps
        if gpu:
            keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            with strategy.scope():
                self.model = build_mlp(args.width, args.depth)
                self.model.compile(
                    keras.optimizers.Adam(1e-3),
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    jit_compile=gpu,
                    steps_per_execution=self.steps_per_execution,
                )
        finally:
            keras.mixed_precision.set_global_policy("float32")
        self.batch, self.strategy = args.batch * replicas, strategy
        x, y = arrays
        self.dataset = (
            tf.data.Dataset.from_tensor_slices((x, y))
            .repeat()
            .batch(self.batch, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        )

    def run(self, steps: int) -> None:
        self.model.fit(self.dataset, epochs=1, steps_per_epoch=steps, verbose=0)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (a test)")
    parser.add_argument("--width", type=int, default=4096, help="hidden units per layer")
    parser.add_argument("--depth", type=int, default=4, help="hidden layers")
    parser.add_argument("--batch", type=int, default=512, help="examples per replica per step")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, order alternated")
    args = parser.parse_args(argv)
    if args.smoke:
        args.width, args.depth, args.batch, args.steps, args.rounds = 32, 2, 8, 5, 2
    return args


def main(argv: Sequence[str] | None = None, print_fn: Callable[[str], None] = print) -> int:
    """Runs the benchmark; returns the exit status (0, also when no GPU is present)."""
    args = parse(argv)
    gpus = tf.config.list_logical_devices("GPU")
    if not gpus and not args.smoke:
        print_fn("gpu_scaling: no GPU present; nothing measured (use --smoke to test on CPU).")
        return 0
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    gpu = bool(gpus)
    one = tf.distribute.get_strategy()  # the default strategy: one device
    replicas = len(devices)
    setups = {"1": 1, **({"N": replicas} if replicas > 1 else {})}
    arrays = random_data(args.batch * replicas * 8)
    variants: dict[str, object] = {}
    for key, n in setups.items():
        # The process's one MirroredStrategy (several collide in their collectives).
        strategy = one if n == 1 else make_strategy("mirrored", 0 if gpu else replicas)
        variants[f"tapeloop_{key}"] = Tapeloop(args, arrays, n, strategy, gpu)
        variants[f"fit_{key}"] = Fit(args, arrays, n, strategy, gpu)
    print_fn(
        f"gpu_scaling: {replicas} {'GPU' if gpu else 'CPU'} device(s), MLP {INPUTS}-"
        f"{'-'.join([str(args.width)] * args.depth)}-{CLASSES}, {args.batch} examples per "
        f"replica, {'mixed_float16 + XLA' if gpu else 'float32 (smoke)'}"
    )
    for name, variant in variants.items():  # warm-up: tracing and compiling
        try:
            variant.run(args.steps)
        except tf.errors.InvalidArgumentError:
            # Keras 3.x: fit with steps_per_execution > 1 under MirroredStrategy failed here
            # on logical CPUs (a collective's shape mismatch); fall back to one step per call.
            if not (name == "fit_N" and variant.steps_per_execution > 1):
                raise
            print_fn("fit_N: steps_per_execution > 1 failed under the strategy; using 1.")
            variants[name] = Fit(args, arrays, replicas, variant.strategy, gpu, 1)
            variants[name].run(args.steps)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            variants[name].run(args.steps)
            rates[name].append(args.steps / (time.perf_counter() - start))
    steps_s = {name: statistics.median(v) for name, v in rates.items()}
    for name, rate in steps_s.items():
        n = setups[name.rsplit("_", 1)[1]]
        print_fn(f"{name:12s} {rate:10.1f} steps/s {rate * args.batch * n:12.0f} examples/s")
    for kind in ("tapeloop", "fit"):
        if f"{kind}_N" in steps_s:
            ratio = steps_s[f"{kind}_N"] * replicas / steps_s[f"{kind}_1"]
            print_fn(f"{kind}: {replicas} replicas vs one, examples/s: {ratio:.2f}x")
    for key in setups:
        ratio = steps_s[f"tapeloop_{key}"] / steps_s[f"fit_{key}"]
        print_fn(f"tapeloop vs fit, {key} replica(s): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
