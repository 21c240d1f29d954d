"""The built-in `mnist` and `cifar10` tasks against Keras `fit` on the same data in memory.

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/tasks.py               # ~1 min on 2 CPU cores
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/tasks.py --rounds 3 --tasks mnist

Each task runs its own loading code on `tfds.testing.mock_data` records (8,192 mnist and 4,096
cifar10 examples: random pixels of the real shapes), so it takes the path it takes on real data
that fits in memory: the split read once into uint8 arrays (`read_to_memory`), batches gathered
in-graph, `preprocess` scaling them in the step. Its evaluation is switched off (an
`eval_dataset` of None), so that both sides time training alone.

Against it, `model.fit(x, y, batch_size, epochs, steps_per_execution=100)` on the same examples
as in-memory float32 NumPy arrays (scaled by NumPy, as a Keras user would pass them), with the
task's own model (`build_model()`), batch size (128), optimizer (Adam, the task's learning rate)
and loss (sparse cross-entropy from logits); `jit_compile` is Keras' "auto".

`--profile` then profiles one round of each (`profiling.kernel_times`) and lists their
costliest kernels per step: where both spend their time in the same kernels (the oneDNN
convolutions of `cifar10`, which neither compiles with XLA on CPU), no loop can be much
faster than the other. Kernels on different threads overlap: their sum exceeds the step.

Both are built and warmed up (first call: tracing, compiling) before timing; then each round
times every variant once, the order alternated from round to round, for the same number of
steps (whole epochs). tapeloop is timed through `train()`, continued by `train_steps` each
call, so its per-call Python work is included, as `fit`'s is. Prints steps/s per round, the
medians and the median of the per-round ratios. On a shared machine the numbers are noisy:
compare ratios from one run, not absolute rates across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from profiling import kernel_times, restart_with_xla_traces, top_kernels


def builtin_tasks() -> dict[str, tuple[type, int, int]]:
    """Name: (task class, mock examples, epochs per timed round)."""
    # Run as a script, this file's folder comes first on sys.path, and there `tasks` is this
    # file: look past it for the package of built-in tasks.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    from tasks.cifar10 import Cifar10
    from tasks.mnist import Mnist

    return {"mnist": (Mnist, 8192, 10), "cifar10": (Cifar10, 4096, 2)}


def without_eval(task_cls: type) -> type:
    """`task_cls` with its evaluation switched off: training is what is timed."""
    return type(task_cls.__name__, (task_cls,), {"eval_dataset": lambda self: None})


class Tapeloop:
    """A built-in task, trained by `train()` in calls of `steps` steps."""

    def __init__(self, task_cls: type, data_dir: str):
        options = task_cls.make_options(data_dir=data_dir, steps_per_loop=100, train_steps=1)
        self.trainer = without_eval(task_cls)(options)

    def run(self, steps: int) -> None:
        t = self.trainer
        t.options = dataclasses.replace(t.options, train_steps=t.step + steps)
        t.train()

    def describe(self) -> str:
        loop = self.trainer.train_loop
        return f"in_memory={loop.in_memory}, xla={loop.xla}"


class Fit:
    """`model.fit` with steps_per_execution=100 on the task's examples as float arrays."""

    def __init__(self, trainer, x: np.ndarray, y: np.ndarray):
        keras.utils.set_random_seed(trainer.options.seed)
        self.model = trainer.build_model()
        self.model.compile(
            optimizer=keras.optimizers.Adam(trainer.options.learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            steps_per_execution=100,
        )
        self.x, self.y, self.batch_size = x, y, trainer.options.batch_size

    def run(self, steps: int) -> None:
        epochs = steps // (len(self.x) // self.batch_size)
        self.model.fit(self.x, self.y, batch_size=self.batch_size, epochs=epochs, verbose=0)

    def describe(self) -> str:
        return f"jit_compile={self.model.jit_compile}"


def float_arrays(trainer) -> tuple[np.ndarray, np.ndarray]:
    """The task's training examples as the model takes them: float32 k/255 from NumPy."""
    images, labels = trainer.train_arrays()
    x = images.astype(np.float32) / np.float32(255)
    return x.reshape(len(x), *trainer.model.input_shape[1:]), labels


def bench(task_cls: type, examples: int, epochs: int, rounds: int, profile: bool) -> None:
    name = task_cls.registered_name
    with tfds.testing.mock_data(num_examples=examples), tempfile.TemporaryDirectory() as data_dir:
        start = time.perf_counter()
        tapeloop = Tapeloop(task_cls, data_dir)
        x, y = float_arrays(tapeloop.trainer)
        variants = {"tapeloop": tapeloop, "fit_spe100": Fit(tapeloop.trainer, x, y)}
        steps = epochs * (examples // tapeloop.trainer.options.batch_size)
        for variant in variants.values():
            variant.run(100)  # traces and compiles
        print(f"[{name}] {examples} mock examples, batch {tapeloop.trainer.options.batch_size}, "
              f"{steps} steps per round; built and warmed up in "
              f"{time.perf_counter() - start:.0f} s")  # fmt: skip
        rates = {key: [] for key in variants}
        order = list(variants)
        for index in range(rounds):
            for key in order[index % 2 :] + order[: index % 2]:  # alternated
                start = time.perf_counter()
                variants[key].run(steps)
                rates[key].append(steps / (time.perf_counter() - start))
    for key, variant in variants.items():
        rounds_text = " ".join(f"{r:.0f}" for r in rates[key])
        print(f"  {key:<11} {statistics.median(rates[key]):7.0f} steps/s (median; rounds: "
              f"{rounds_text})  {variant.describe()}")  # fmt: skip
    ratios = [a / b for a, b in zip(rates["tapeloop"], rates["fit_spe100"])]
    print(f"  tapeloop / fit_spe100: {statistics.median(ratios):.2f}x (median of per-round "
          f"ratios; range {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    if profile:
        for key, variant in variants.items():
            kernels = kernel_times(lambda variant=variant: variant.run(steps), steps)
            print(f"  {key} (profiled, one round):")
            print("\n".join("    " + line for line in top_kernels(kernels, 8)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per task")
    parser.add_argument("--tasks", default="mnist,cifar10", help="comma-separated subset")
    parser.add_argument("--profile", action="store_true", help="per-kernel times, one round")
    args = parser.parse_args()
    if args.profile:
        restart_with_xla_traces()
    logging.set_verbosity(logging.WARNING)  # no progress lines between the timings
    tf.get_logger().setLevel("ERROR")  # nor TFDS mocking's deprecation notes
    tfds.disable_progress_bar()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    tasks = builtin_tasks()
    for name in args.tasks.split(","):
        bench(*tasks[name], rounds=args.rounds, profile=args.profile)
    print(f"load average {os.getloadavg()[0]:.1f} at the end; a shared machine: noisy numbers")


if __name__ == "__main__":
    main()
