"""TensorBoard summaries' cost: the seed MLP's loop with and without in-loop scalars.

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/investigations/summaries.py

Two Trainers (in-memory data, default XLA loop, L2 + decoupled decay, 1000 steps per call),
one writing every `summary_every=100` steps; calls alternate, 7 rounds, medians compared.
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from trainer import L2, DecoupledWeightDecay, Trainer, TrainerOptions

rng = np.random.default_rng(0)
x = rng.standard_normal((8192, 784), dtype=np.float32)
y = rng.integers(0, 10, (8192,), dtype=np.int32)


class SeedMlp(Trainer):
    """The seed MLP on random in-memory data."""

    def build_model(self):
        return keras.Sequential(
            [keras.Input((784,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)]
        )

    def train_arrays(self):
        return x, y

    def compute_loss(self, labels, outputs):
        return keras.losses.sparse_categorical_crossentropy(labels, outputs, from_logits=True)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    runs = {}
    for name, every in (("no summaries", 0), ("summary_every=100", 100)):
        t = SeedMlp(
            TrainerOptions(batch_size=128, steps_per_loop=1000, summary_every=every),
            penalties=[L2(1e-4), DecoupledWeightDecay(1e-2)],
        )
        loop = t.train_loop  # builds the model and loads the arrays
        if every:
            loop.set_summary_dir(tempfile.mkdtemp())
        loop.run(1000)
        runs[name] = (loop, [])
    for _ in range(7):
        for loop, times in runs.values():
            s = time.perf_counter()
            loop.run(1000)
            times.append(time.perf_counter() - s)
    base = statistics.median(runs["no summaries"][1])
    for name, (_, times) in runs.items():
        m = statistics.median(times)
        change = 100 * (m / base - 1)
        print(f"{name}: {1000 / m:.0f} steps/s (median of 7 x 1000 steps), {change:+.1f}%")


if __name__ == "__main__":
    main()
