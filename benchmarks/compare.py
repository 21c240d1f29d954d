"""tapeloop vs a hand-written GradientTape loop vs `model.fit`: steps/s, overheads, FLOP floor.

Usage (from the repository root, with the project installed):

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/compare.py            # ~4-6 min on 2 CPU cores
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/compare.py --quick    # ~1.5 min smoke run
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/compare.py --repeats 8 --workloads seed_mlp
    # small per-step overheads, without cross-thread wake-ups (one TF thread):
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/compare.py --threads 1 --workloads seed_mlp

Everything runs in one process. Each workload (the seed MLP 784-64-10, a compute-bound MLP
784-1024-1024-10, a small CNN on 32x32x3) gets the same model, random in-memory data and
optimizer (Adam, lr 1e-3) in every variant:

  hand_loop       the seed article's Example 3, corrected: a `@tf.function` GradientTape step
                  called once per batch from Python over a tf.data iterator
  hand_loop_100   the same step, 100 steps per call (`tf.range` over the iterator in one
                  tf.function): the reference for tapeloop's overhead at equal steps per call
  fit             `compile(Adam, SparseCategoricalCrossentropy(from_logits=True))`, `fit`
  fit_spe100      the same with `steps_per_execution=100`
  tapeloop        a `trainer.Trainer` fed the same tf.data pipeline, default options
                  (steps_per_loop=100; no XLA with a tf.data input)
  tapeloop_spl    tapeloop with steps_per_loop = all timed steps in one call, no XLA
  tapeloop_fast   tapeloop with steps_per_loop = all timed steps and jit_compile=True (XLA on
                  the step)
  tapeloop_arrays tapeloop's defaults for data that fits in memory: the same data through
                  `Trainer.train_arrays`, batched inside the loop, default options (100 steps
                  per call; XLA over the whole loop, except for convolutions on CPU)
  hand_arrays_xla those options written by hand: in-memory batches gathered in-graph, the
                  whole loop one XLA computation (not on the CNN: XLA:CPU convolutions are
                  13-24x slower): the reference for tapeloop_arrays' framework overhead

On the seed MLP also: tapeloop_arrays with each penalty (L2, SelectiveL2,
DecoupledWeightDecay, L2 + DecoupledWeightDecay), and diagnostic variants (`--no-diagnostics`
skips them) that add tapeloop's extra work to `hand_loop_100` one piece at a time, to locate
its overhead. A `matmul` pseudo-variant (a 2048x2048 float32 matmul chain inside a tf.function,
plain and XLA-compiled) measures the sustained GFLOP/s for the "time over FLOP floor" column.

Timing: every variant is built once and warmed up (its first call, which traces and compiles,
is reported separately), then the rounds run round-robin, the variant order rotated each
round, so that machine noise hits every variant alike. Each round times a fixed number of
steps per variant: 200 on the seed MLP (10 rounds), 40 on the big MLP and 20 on the CNN (3
rounds each; `--quick`: 200, 5, 5, one round); "100 steps per call" means min(100, that
number), shown in the steps/call column. Ratios are medians of per-round (paired) ratios.

Noise: on a shared machine another process can take a core for minutes. Every timed
repetition records the CPU that other processes used meanwhile (from /proc); one where they
used more than 0.3 core is timed again (at most twice, within `--retry-budget` seconds for the
whole run) and the least contended try is kept; the tables count the repetitions still
contended. The tables also give this process's CPU time per step ("CPU ms"), which another
process taking the other core disturbs far less than wall time: use it to compare small
overheads when the wall times are bimodal. With TensorFlow's default threads, a small model's
steps also wait on cross-thread wake-ups, which on a 2-vCPU VM makes its wall time jump
between levels (e.g. ~0.75, ~1.5 and ~3 ms per step for the seed MLP) from one repetition to
the next; `--threads 1` runs everything on one TensorFlow thread and gives stable per-step
numbers for attributing overheads of a few percent (it slows the compute-bound workloads).

tapeloop is timed through its public `train()`: one Trainer per variant, built and traced
once; each timed repetition sets `trainer.options = dataclasses.replace(options,
train_steps=trainer.step + K)` and calls `train()` again, which continues from the current
step on a fresh iterator, exactly like another `fit` call. A fresh Trainer per repetition
would retrace the step every time (1-4 s, more than the timed steps themselves). The timing
therefore includes `train()`'s per-call Python work (iterator creation, loss read-back, log
formatting, the end-of-training `evaluate()`), as `fit`'s timing includes its callbacks. The
diagnostic `tapeloop_loop_only` calls the private `trainer._train_loop(iterator, n)` directly
to separate that Python work from the in-graph loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import trainer
from trainer import L2, DecoupledWeightDecay, SelectiveL2, Trainer, TrainerOptions

LEARNING_RATE = 1e-3
NUM_CLASSES = 10
MATMUL_N = 2048
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- workloads -----------------------------------------------------------------------------


def seed_mlp() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


def big_mlp() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


def small_cnn() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


@dataclasses.dataclass
class Workload:
    name: str
    title: str
    build_model: Callable[[], keras.Model]
    input_shape: tuple[int, ...]
    batch_size: int
    examples: int
    steps: int  # timed steps per variant per round
    repeats: int
    penalties: bool = False  # the penalty-overhead variants
    diagnostics: bool = False  # the hand-loop variants that mimic tapeloop
    matmul_calls: int = 3  # 2048^2 matmuls per timed matmul repetition
    first_steps: int = 100  # steps of an in-graph loop's first (tracing) call
    dataset: tf.data.Dataset | None = None
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after timing

    @property
    def steps_per_call(self) -> int:
        """100 steps per tf.function call, or all the timed steps if fewer."""
        return min(100, self.steps)

    def make_dataset(self) -> tf.data.Dataset:
        """Random features and int labels in [0, 10), pre-batched in memory, repeated.

        The data are sliced into whole batches up front, so that the input pipeline costs
        one slice per step (no per-example batching) and the loops, not tf.data, are timed.
        """
        x, y = self.arrays()
        n = self.examples // self.batch_size
        x = x.reshape((n, self.batch_size, *self.input_shape))
        y = y.reshape((n, self.batch_size))
        return tf.data.Dataset.from_tensor_slices((x, y)).repeat().prefetch(tf.data.AUTOTUNE)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The same examples unbatched: `(x [examples, ...], y [examples])`."""
        rng = np.random.default_rng(0)
        n = self.examples // self.batch_size * self.batch_size
        x = rng.standard_normal((n, *self.input_shape), dtype=np.float32)
        y = rng.integers(0, NUM_CLASSES, (n,), dtype=np.int32)
        return x, y


def forward_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one example's forward pass: Dense and Conv2D layers only."""
    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            macs += layer.kernel.shape[0] * layer.kernel.shape[1]
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            _, oh, ow, _ = layer.output.shape
            macs += oh * ow * cout * kh * kw * cin
    return macs


def train_flops(workload: Workload) -> tuple[int, int]:
    """(forward MACs per example, FLOPs per training step = 3 · 2 · MACs · batch)."""
    macs = forward_macs(workload.build_model())
    return macs, 3 * 2 * macs * workload.batch_size


# ---- variants ------------------------------------------------------------------------------


def sync(model: keras.Model) -> None:
    """Waits for the step's updates: reads one weight back."""
    model.trainable_variables[-1].numpy()


class Variant:
    """Something that runs training steps; `run(n)` returns when they are done."""

    group = "main"
    steps_per_call = 1
    in_graph_loop = False  # steps counted by a tensor inside one tf.function call
    note = ""
    model: keras.Model | None = None

    def __init__(self, name: str, workload: Workload):
        self.name = name
        self.workload = workload

    def build(self) -> None:
        raise NotImplementedError

    def run(self, n: int) -> None:
        raise NotImplementedError

    def tracing_count(self) -> int | None:
        return None

    def loop_ops(self) -> int | None:
        """Graph ops in one iteration of the in-graph loop (before Grappler), when there is one."""
        return None


def new_optimizer() -> keras.optimizers.Optimizer:
    return keras.optimizers.Adam(LEARNING_RATE)


def hand_setup(workload: Workload) -> tuple[keras.Model, list, keras.optimizers.Optimizer, Any]:
    """A hand-written loop's model (seeded), its variables, a built Adam and the loss object."""
    keras.utils.set_random_seed(0)
    model = workload.build_model()
    variables = model.trainable_variables
    optimizer = new_optimizer()
    optimizer.build(variables)
    return model, variables, optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class HandLoop(Variant):
    """The corrected Example 3 step, called once per batch or `per_call` times in one call.

    `extras` adds tapeloop's work one piece at a time (diagnostics):
      strategy_run: the step runs through `strategy.run` of the default strategy, its losses
        through `strategy.reduce` (as `Trainer._train_steps` does);
      loss_path: tapeloop's loss: outputs cast to float32, per-example losses from
        `keras.losses.sparse_categorical_crossentropy`, `tf.nn.compute_average_loss`,
        a zero penalty through `tf.nn.scale_regularization_loss`;
      accumulate: `[total, data_loss]` stacked and added to a `tf.Variable` each step, a
        float count and an int64 step counter variable incremented;
      finite_break: the loop ends early (`break`) when a loss is not finite (checked each step).
    """

    def __init__(self, name, workload, per_call=1, extras=(), group="main", note=""):
        super().__init__(name, workload)
        self.steps_per_call = per_call
        self.in_graph_loop = per_call > 1
        self.extras = frozenset(extras)
        self.group = group
        self.note = note

    def build(self) -> None:
        model, variables, optimizer, loss_object = hand_setup(self.workload)
        self.model = model
        extras = self.extras
        strategy = tf.distribute.get_strategy()
        if "accumulate" in extras:
            self.sums = tf.Variable(tf.zeros([2]), trainable=False)
            self.count = tf.Variable(0.0, trainable=False)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False)

        def step(images, labels):
            with tf.GradientTape() as tape:
                if "loss_path" in extras:
                    logits = tf.cast(model(images, training=True), tf.float32)
                    per_example = tf.cast(
                        keras.losses.sparse_categorical_crossentropy(
                            labels, logits, from_logits=True
                        ),
                        tf.float32,
                    )
                    data_loss = tf.nn.compute_average_loss(per_example)
                    loss = data_loss + tf.nn.scale_regularization_loss(tf.constant(0.0))
                else:
                    data_loss = loss = loss_object(labels, model(images, training=True))
            gradients = tape.gradient(loss, variables)
            optimizer.apply_gradients(zip(gradients, variables))
            return [loss, data_loss]

        def one_step(images, labels):
            if "strategy_run" in extras:
                losses = strategy.run(step, args=(images, labels))
                losses = [strategy.reduce(tf.distribute.ReduceOp.SUM, t, axis=None) for t in losses]
            else:
                losses = step(images, labels)
            if not extras & {"accumulate", "finite_break"}:
                return losses[0]  # Example 3: nothing but the step
            losses = tf.stack(losses)
            if "accumulate" in extras:
                self.sums.assign_add(losses)
                self.count.assign_add(1.0)
                self.step.assign_add(1)
            return losses

        if self.steps_per_call == 1:
            self.fn = tf.function(one_step)
        else:

            def loop(iterator, num_steps):
                for _ in tf.range(num_steps):
                    images, labels = next(iterator)
                    losses = one_step(images, labels)
                    if "finite_break" in extras:
                        if not tf.reduce_all(tf.math.is_finite(losses)):
                            break

            self.fn = tf.function(loop)

    def run(self, n: int) -> None:
        iterator = iter(self.workload.dataset)
        if self.steps_per_call == 1:
            for _ in range(n):
                images, labels = next(iterator)
                self.fn(images, labels)
        else:
            calls, rest = divmod(n, self.steps_per_call)
            for k in [self.steps_per_call] * calls + ([rest] if rest else []):
                self.fn(iterator, tf.constant(k, tf.int32))
        sync(self.model)

    def tracing_count(self) -> int:
        return self.fn.experimental_get_tracing_count()

    def loop_ops(self) -> int | None:
        if self.steps_per_call == 1:
            return None
        concrete = self.fn.get_concrete_function(
            iter(self.workload.dataset), tf.constant(1, tf.int32)
        )
        return while_body_ops(concrete)


class HandArraysXla(Variant):
    """tapeloop_arrays' options written by hand: in-memory data in variables, batch `t` gathered
    in-graph from a shuffled order (one fixed permutation: cheaper than tapeloop's fresh
    order per epoch), the whole `per_call`-step loop one XLA computation (`tf.while_loop`
    under `jit_compile=True`); the corrected Example 3 step.

    Like Example 3, the loop never reads the loss, so XLA prunes the loss value (its
    log-sum-exp and sum) and computes only its gradient. `track_loss` makes the loop return
    the mean loss, as a loop that logs its loss does (tapeloop reports the mean loss
    breakdown of every loop).
    """

    in_graph_loop = True

    def __init__(self, name, workload, per_call, track_loss=False, group="main", note=""):
        super().__init__(name, workload)
        self.steps_per_call = per_call
        self.track_loss = track_loss
        self.group = group
        self.note = note

    def build(self) -> None:
        model, variables, optimizer, loss_object = hand_setup(self.workload)
        self.model = model
        x, y = self.workload.arrays()
        xs, ys = tf.Variable(x, trainable=False), tf.Variable(y, trainable=False)
        batch_size = self.workload.batch_size
        batches = len(x) // batch_size
        order = tf.Variable(np.random.default_rng(1).permutation(len(x)).astype(np.int32))
        step = tf.Variable(0, dtype=tf.int32, trainable=False)

        def body(i, loss_sum):
            indices = tf.gather(order, (step % batches) * batch_size + tf.range(batch_size))
            with tf.GradientTape() as tape:
                logits = model(tf.gather(xs, indices), training=True)
                loss = loss_object(tf.gather(ys, indices), logits)
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            step.assign_add(1)
            return i + 1, loss_sum + loss

        @tf.function(jit_compile=True)
        def loop(num_steps):
            _, loss_sum = tf.while_loop(
                lambda i, _: i < num_steps, body, [tf.constant(0), tf.constant(0.0)]
            )
            if self.track_loss:
                return loss_sum / tf.cast(num_steps, tf.float32)
            return None  # the loss unused: XLA prunes its value

        self.fn = loop

    def run(self, n: int) -> None:
        calls, rest = divmod(n, self.steps_per_call)
        for k in [self.steps_per_call] * calls + ([rest] if rest else []):
            mean_loss = self.fn(tf.constant(k, tf.int32))
            if self.track_loss:
                float(mean_loss)  # read back once per call, as tapeloop's progress does
        sync(self.model)

    def tracing_count(self) -> int:
        return self.fn.experimental_get_tracing_count()


class Fit(Variant):
    def __init__(self, name, workload, steps_per_execution=1):
        super().__init__(name, workload)
        self.steps_per_execution = self.steps_per_call = steps_per_execution

    def build(self) -> None:
        keras.utils.set_random_seed(0)
        self.model = self.workload.build_model()
        self.model.compile(
            optimizer=new_optimizer(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            steps_per_execution=self.steps_per_execution,
        )
        self.note = f"compile(jit_compile='auto') -> {self.model.jit_compile}"

    def run(self, n: int) -> None:
        self.model.fit(self.workload.dataset, steps_per_epoch=n, epochs=1, verbose=0)

    def tracing_count(self) -> int | None:
        function = getattr(self.model, "train_function", None)
        count = getattr(function, "experimental_get_tracing_count", None)
        return count() if count else None


class BenchTask(Trainer):
    """A tapeloop task on a workload's model and data; per-example sparse cross-entropy."""

    def __init__(self, workload: Workload, options: TrainerOptions, penalties=()):
        self.workload = workload
        super().__init__(options, penalties=penalties)

    def build_model(self) -> keras.Model:
        return self.workload.build_model()

    def train_dataset(self) -> tf.data.Dataset:
        return self.workload.dataset

    def compute_loss(self, labels, outputs):
        return keras.losses.sparse_categorical_crossentropy(labels, outputs, from_logits=True)


class ArraysBenchTask(BenchTask):
    """The same task through `Trainer.train_arrays` (in-memory batches drawn in the loop)."""

    def train_arrays(self):
        return self.workload.arrays()


def option_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainerOptions)}


class Tapeloop(Variant):
    """A `BenchTask` timed through `train()` (see the module docstring), or `_train_loop`."""

    def __init__(
        self,
        name,
        workload,
        options=None,
        penalties=list,
        group="main",
        loop_only=False,
        task=BenchTask,
    ):
        super().__init__(name, workload)
        self.task = task
        self.in_graph_loop = True
        self.extra_options = {k: v for k, v in (options or {}).items() if k in option_fields()}
        self.penalty_factory = penalties
        self.group = group
        self.loop_only = loop_only

    def build(self) -> None:
        options = TrainerOptions(
            batch_size=self.workload.batch_size,
            train_steps=1,
            learning_rate=LEARNING_RATE,
            optimizer="adam",
            **self.extra_options,
        )
        self.steps_per_call = min(options.steps_per_loop, self.workload.steps)
        self.trainer = self.task(self.workload, options, penalties=self.penalty_factory())
        self.model = self.trainer.model  # builds: model, optimizer, penalties, tf.functions
        self.note = ", ".join(f"{k}={v}" for k, v in self.extra_options.items()) or "defaults"
        if self.trainer.penalties:
            self.note = " + ".join(repr(p) for p in self.trainer.penalties)
        if self.loop_only:
            self.note = "trainer._train_loop(iterator, n) only, no train()"
        if self.task is ArraysBenchTask:
            self.note = f"train_arrays(), {self.note}"

    def run(self, n: int) -> None:
        t = self.trainer
        if self.loop_only:
            iterator = iter(self.workload.dataset)
            calls, rest = divmod(n, self.steps_per_call)
            for k in [self.steps_per_call] * calls + ([rest] if rest else []):
                t._train_loop(iterator, tf.constant(k, tf.int32))
            sync(self.model)
            return
        t.options = dataclasses.replace(t.options, train_steps=t.step + n)
        t.train()

    def tracing_count(self) -> int | None:
        function = getattr(self.trainer, "_train_loop", None)
        count = getattr(function, "experimental_get_tracing_count", None)
        return count() if count else None

    def loop_ops(self) -> int | None:
        function = getattr(self.trainer, "_train_loop", None)
        if not hasattr(function, "get_concrete_function"):
            return None
        # The loop's first argument, as train() passes it: None when the loop batches
        # train_arrays() itself (another value would trace another concrete function).
        iterator = None if self.task is ArraysBenchTask else iter(self.workload.dataset)
        concrete = function.get_concrete_function(iterator, tf.constant(1, tf.int32))
        return while_body_ops(concrete)


class Matmul(Variant):
    """A chain of 2048x2048 float32 matmuls in a `tf.range` loop inside one tf.function."""

    group = "matmul"

    def __init__(self, name, workload, jit_compile=False):
        super().__init__(name, workload)
        self.jit_compile = jit_compile
        self.note = "XLA" if jit_compile else "plain tf.function"

    def build(self) -> None:
        rng = np.random.default_rng(1)
        a = tf.constant(rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32))
        w = tf.constant(
            (rng.standard_normal((MATMUL_N, MATMUL_N)) / np.sqrt(MATMUL_N)).astype(np.float32)
        )

        if self.jit_compile:
            # XLA compiles the loop body; the while loop itself runs in TF.
            matmul = tf.function(lambda x: tf.matmul(x, w), jit_compile=True)
        else:
            matmul = lambda x: tf.matmul(x, w)  # noqa: E731

        @tf.function
        def chain(n):
            x = a
            for _ in tf.range(n):
                x = matmul(x)  # each matmul depends on the last: nothing to fold or skip
            return x[0, 0]

        self.fn = chain

    def run(self, n: int) -> None:
        self.fn(tf.constant(n, tf.int32)).numpy()


def while_body_ops(concrete) -> int | None:
    """Nodes in the body of the first While loop of a concrete function's graph, counting
    the nodes of functions it calls (recursively); before Grappler's rewrites."""
    graph_def = concrete.graph.as_graph_def()
    library = {f.signature.name: f for f in graph_def.library.function}
    # The first While in the graph, else in the functions it calls (e.g. an XLA-compiled loop).
    nodes = list(graph_def.node)
    body = None
    for node in nodes:
        if node.op in ("While", "StatelessWhile"):
            body = node.attr["body"].func.name
            break
        called = [v.func.name for v in node.attr.values() if v.HasField("func")]
        nodes += [n for name in called if name in library for n in library[name].node_def]
    if body is None:
        return None

    def count(name: str, seen: tuple[str, ...] = ()) -> int:
        if name not in library or name in seen:
            return 0
        total = 0
        for node in library[name].node_def:
            total += 1
            if node.op in library:
                total += count(node.op, (*seen, name))
            for value in node.attr.values():
                if value.HasField("func"):
                    total += count(value.func.name, (*seen, name))
        return total

    return count(body)


# ---- measuring -----------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    variant: Variant
    first_call_s: float = 0.0
    rates: list[float] = dataclasses.field(default_factory=list)  # steps/s per round
    foreign: list[float] = dataclasses.field(default_factory=list)  # others' CPU, in cores
    cpu_ms: list[float] = dataclasses.field(default_factory=list)  # this process's CPU ms/step
    retries: int = 0
    first_steps: int = 0
    steps: int = 0  # timed steps per repetition (fewer for a very slow variant)
    traces_after_warmup: int | None = None
    traces_after_timing: int | None = None
    loop_ops: int | None = None
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def variants_for(w: Workload, diagnostics: bool) -> list[Variant]:
    spc = w.steps_per_call
    fields = option_fields()
    fast = {"steps_per_loop": w.steps}
    if "jit_compile" in fields:
        fast["jit_compile"] = True
    variants: list[Variant] = [
        HandLoop("hand_loop", w, per_call=1),
        HandLoop("hand_loop_100", w, per_call=spc),
        Fit("fit", w, steps_per_execution=1),
        Fit("fit_spe100", w, steps_per_execution=spc),
        Tapeloop("tapeloop", w),  # default options: steps_per_loop=100
    ]
    if w.steps > spc:  # otherwise the same as `tapeloop`
        variants.append(Tapeloop("tapeloop_spl", w, options={"steps_per_loop": w.steps}))
    variants.append(Tapeloop("tapeloop_fast", w, options=fast))
    # The in-memory input path (`train_arrays`) with default options: tapeloop's defaults for
    # data that fits in memory (XLA over the whole loop, chosen by the framework, except for
    # convolutions on CPU), against the same options written by hand.
    variants.append(Tapeloop("tapeloop_arrays", w, task=ArraysBenchTask))
    if w.name != "cnn":  # XLA:CPU convolutions are 13-24x slower: tapeloop leaves XLA off
        variants.append(HandArraysXla("hand_arrays_xla", w, per_call=spc))
    if w.penalties:
        for name, make in (
            ("pen_l2", lambda: [L2(1e-4)]),
            ("pen_selective_l2", lambda: [SelectiveL2(1e-4, exclude="bias")]),
            ("pen_decoupled_wd", lambda: [DecoupledWeightDecay(1e-2)]),
            ("pen_l2+decoupled_wd", lambda: [L2(1e-4), DecoupledWeightDecay(1e-2)]),
        ):
            variants.append(
                Tapeloop(name, w, penalties=make, group="penalty", task=ArraysBenchTask)
            )
    if diagnostics and w.diagnostics and w.name != "cnn":
        variants += [
            HandArraysXla(
                "hand_arrays_xla_loss",
                w,
                per_call=spc,
                track_loss=True,
                group="diagnostic",
                note="+ returns the mean loss (its value no longer pruned by XLA)",
            ),
            HandArraysXla(
                "hand_arrays_xla_twin",
                w,
                per_call=spc,
                group="diagnostic",
                note="a second, identical hand_arrays_xla: the noise floor of the comparison",
            ),
        ]
    if diagnostics and w.diagnostics:
        variants += [
            Tapeloop(
                "tapeloop_loop_only",
                w,
                options={"steps_per_loop": spc},
                group="diagnostic",
                loop_only=True,
            ),
            HandLoop(
                "hand_100+run",
                w,
                per_call=spc,
                extras={"strategy_run"},
                group="diagnostic",
                note="+ strategy.run / strategy.reduce (default strategy)",
            ),
            HandLoop(
                "hand_100+run+loss",
                w,
                per_call=spc,
                extras={"strategy_run", "loss_path"},
                group="diagnostic",
                note="+ tapeloop's loss path (cast, per-example, compute_average_loss)",
            ),
            HandLoop(
                "hand_100+run+loss+acc",
                w,
                per_call=spc,
                extras={"strategy_run", "loss_path", "accumulate"},
                group="diagnostic",
                note="+ loss sums, count, int64 step accumulated in tf.Variables",
            ),
            HandLoop(
                "hand_100+all+break",
                w,
                per_call=spc,
                extras={"strategy_run", "loss_path", "accumulate", "finite_break"},
                group="diagnostic",
                note="+ `if not all(isfinite(losses)): break` each step",
            ),
        ]
    variants += [Matmul("matmul", w), Matmul("matmul_xla", w, jit_compile=True)]
    return variants


def steps_for(result: Result) -> int:
    v = result.variant
    return v.workload.matmul_calls if isinstance(v, Matmul) else v.workload.steps


CONTENDED_CORES = 0.3  # other processes' CPU use (in cores) that marks a repetition contended
MAX_REPETITION_S = 5.0  # a variant slower than this per repetition times fewer steps after


def cpu_ticks() -> tuple[int, int] | None:
    """(busy clock ticks of the whole machine, of this process), from /proc; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(
                int, f.readline().split()[1:9]
            )
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return user + nice + system + irq + softirq + steal, int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def timed_run(variant: Variant, steps: int) -> tuple[float, float, float]:
    """(steps/s, this process's CPU ms per step, other processes' CPU use in cores meanwhile)."""
    before = cpu_ticks()
    cpu_start = time.process_time()
    start = time.perf_counter()
    variant.run(steps)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    after = cpu_ticks()
    foreign = float("nan")
    if before and after:
        ticks = (after[0] - before[0]) - (after[1] - before[1])
        foreign = max(ticks, 0) / os.sysconf("SC_CLK_TCK") / wall
    return steps / wall, 1e3 * cpu / steps, foreign


@dataclasses.dataclass
class RetryBudget:
    """Re-timing of contended repetitions: at most `per_repetition` times each, and at most
    `seconds` added to the whole run."""

    seconds: float = 0.0
    per_repetition: int = 2


RETRIES = RetryBudget()


def measure_workload(w: Workload, diagnostics: bool, log: Callable[[str], None]) -> list[Result]:
    w.dataset = w.make_dataset()
    results = [Result(v) for v in variants_for(w, diagnostics)]
    log(f"[{w.name}] building and warming up {len(results)} variants")
    for r in results:
        v = r.variant
        try:
            v.build()
            # The first call traces and compiles. In-graph loops take their step count as a
            # tensor, so it may run fewer steps than later calls (`first_steps`); fit runs a
            # whole execution (steps_per_execution steps).
            first = min(v.steps_per_call, w.first_steps) if v.in_graph_loop else v.steps_per_call
            first = 1 if isinstance(v, Matmul) else first
            start = time.perf_counter()
            v.run(first)
            r.first_call_s = time.perf_counter() - start
            r.first_steps = first
            if first == 1:
                v.run(first)  # cheap: anything lazily built on the first call is built
            r.steps = steps_for(r)
            r.loop_ops = v.loop_ops()
            r.traces_after_warmup = v.tracing_count()
        except Exception as e:  # a variant that breaks is reported, the others still run
            r.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"  {v.name}: FAILED in warm-up: {r.error}")
    live = [r for r in results if r.error is None]
    load_before = os.getloadavg()[0]
    for round_index in range(w.repeats):
        shift = round_index % len(live)
        order = live[shift:] + live[:shift]  # rotated: no variant always first or last
        for r in order:
            steps = r.steps
            rate, cpu_ms, foreign = timed_run(r.variant, steps)
            # Another process took a share of the cores: time it again, while the budget lasts;
            # keep the least contended try.
            for _ in range(RETRIES.per_repetition):
                if not (foreign > CONTENDED_CORES and RETRIES.seconds > 0):
                    break
                start = time.perf_counter()
                again = timed_run(r.variant, steps)
                RETRIES.seconds -= time.perf_counter() - start
                r.retries += 1
                if again[2] < foreign:
                    rate, cpu_ms, foreign = again
            r.rates.append(rate)
            r.cpu_ms.append(cpu_ms)
            r.foreign.append(foreign)
            if steps / rate > MAX_REPETITION_S:  # a slow variant: time fewer steps from now on
                least = r.variant.steps_per_call if isinstance(r.variant, Fit) else 1
                r.steps = max(least, int(steps * MAX_REPETITION_S / 2 * rate / steps))
        log(f"[{w.name}] round {round_index + 1}/{w.repeats} done")
    w.load = (load_before, os.getloadavg()[0])
    for r in live:
        r.traces_after_timing = r.variant.tracing_count()
    return results


# ---- reporting -----------------------------------------------------------------------------


def paired_ratio(a: Result, b: Result) -> float:
    """Median over rounds of a's steps/s / b's steps/s in the same round."""
    return statistics.median(x / y for x, y in zip(a.rates, b.rates))


def paired_overhead(a: Result, b: Result) -> tuple[float, float, float, float, float]:
    """Overheads of a over b in %: wall step time (t_a / t_b - 1 = rate_b / rate_a - 1) as the
    median and range of the per-round pairs, best (highest rate) against best, and this
    process's CPU time per step as the median of the per-round pairs."""
    values = sorted((rb / ra - 1.0) * 100.0 for ra, rb in zip(a.rates, b.rates))
    best = (max(b.rates) / max(a.rates) - 1.0) * 100.0
    cpu = statistics.median((ca / cb - 1.0) * 100.0 for ca, cb in zip(a.cpu_ms, b.cpu_ms))
    return statistics.median(values), values[0], values[-1], best, cpu


GROUP_TITLES = {
    "penalty": "-- penalties: tapeloop_arrays (defaults, in-memory; none = that row)",
    "diagnostic": "-- diagnostics: hand_loop_100 plus tapeloop's extra work, piece by piece; "
    "tapeloop's in-graph loop alone",
}


def fmt_rate(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def report_workload(w: Workload, results: list[Result], print_=print) -> dict[str, Any]:
    by_name = {r.variant.name: r for r in results if r.error is None}
    macs, flops = train_flops(w)
    gflops = {}
    for name in ("matmul", "matmul_xla"):
        if name in by_name:
            per_call = 2 * MATMUL_N**3
            gflops[name] = by_name[name].median * per_call / 1e9
    sustained = max(gflops.values()) if gflops else float("nan")
    floor_s = flops / (sustained * 1e9)
    print_()
    print_(f"=== {w.title}: batch {w.batch_size}, {w.steps} timed steps x {w.repeats} rounds ===")
    print_(
        f"FLOPs/step = 3 x 2 x forward MACs/example x batch = 6 x {macs:,} x {w.batch_size} "
        f"= {flops / 1e9:.3f} GFLOP (Dense+Conv only; an upper estimate: the first layer's "
        "input gradient is not computed)"
    )
    print_(
        "sustained matmul (2048^2 float32, median): "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in gflops.items())
        + f"; floor uses {sustained:.1f} GFLOP/s -> {floor_s * 1e3:.3f} ms/step"
    )
    foreign = [f for r in by_name.values() for f in r.foreign if f == f]  # not NaN
    if foreign:
        contended = sum(f > CONTENDED_CORES for f in foreign)
        retries = sum(r.retries for r in by_name.values())
        print_(
            "other processes' CPU during the timed repetitions: median "
            f"{statistics.median(foreign):.2f} cores, max {max(foreign):.2f}; {contended} of "
            f"{len(foreign)} repetitions contended "
            f"(> {CONTENDED_CORES} core) after {retries} re-timings; 1-min load average "
            f"{w.load[0]:.2f} -> {w.load[1]:.2f}"
        )
    fit, fit100 = by_name.get("fit"), by_name.get("fit_spe100")
    header = (
        f"{'variant':<22}{'steps/call':>10}{'first call s':>13}{'~trace s':>9}"
        f"{'steps/s med':>12}{'[min .. max]':>18}{'ms/step':>9}{'CPU ms':>8}"
        f"{'x fit':>7}{'x spe100':>9}"
        f"{'x floor':>8}{'ops/step':>9}{'cont.':>6}  notes"
    )
    print_(header)
    print_("-" * len(header))
    group = "main"
    for r in results:
        v = r.variant
        if isinstance(v, Matmul):
            continue
        if v.group != group:
            group = v.group
            print_(GROUP_TITLES.get(group, f"-- {group}"))
        if r.error:
            print_(f"{v.name:<22}  FAILED: {r.error}")
            continue
        med = r.median
        trace = r.first_call_s - r.first_steps / med
        spread = f"[{fmt_rate(min(r.rates))} .. {fmt_rate(max(r.rates))}]"
        notes = [v.note] if v.note else []
        if r.steps != steps_for(r):
            notes.append(f"slow: timed {r.steps} steps/repetition after the first")
        if (
            r.traces_after_timing is not None
            and r.traces_after_warmup is not None
            and r.traces_after_timing != r.traces_after_warmup
        ):
            notes.append(
                f"RETRACED during timing ({r.traces_after_warmup}->{r.traces_after_timing})"
            )
        print_(
            f"{v.name:<22}{v.steps_per_call:>10}{r.first_call_s:>13.2f}{trace:>9.2f}"
            f"{fmt_rate(med):>12}{spread:>18}"
            f"{1e3 / med:>9.3f}{statistics.median(r.cpu_ms):>8.3f}"
            f"{(paired_ratio(r, fit) if fit else float('nan')):>7.2f}"
            f"{(paired_ratio(r, fit100) if fit100 else float('nan')):>9.2f}"
            f"{(1.0 / med) / floor_s:>8.1f}"
            f"{(str(r.loop_ops) if r.loop_ops is not None else '-'):>9}"
            f"{sum(f > CONTENDED_CORES for f in r.foreign):>6}"
            f"  {'; '.join(notes)}"
        )
    summary: dict[str, Any] = {"gflops": gflops}
    lines = []

    def overhead_line(label: str, a: str, b: str) -> None:
        if a in by_name and b in by_name:
            med, lo, hi, best, cpu = paired_overhead(by_name[a], by_name[b])
            summary[f"{a} vs {b}"] = med
            lines.append(
                f"  {label:<60}{med:+7.1f} %  [{lo:+6.1f} .. {hi:+6.1f}]  best/best {best:+6.1f} %"
                f"  CPU/step {cpu:+6.1f} %"
            )

    overhead_line(
        "framework: tapeloop vs hand_loop_100 (same steps/call)", "tapeloop", "hand_loop_100"
    )
    overhead_line("tapeloop_spl vs hand_loop_100", "tapeloop_spl", "hand_loop_100")
    overhead_line("tapeloop_fast vs hand_loop_100", "tapeloop_fast", "hand_loop_100")
    overhead_line("tapeloop vs fit_spe100 (same steps/call)", "tapeloop", "fit_spe100")
    overhead_line(
        "framework, in-memory + XLA: tapeloop_arrays vs hand_arrays_xla",
        "tapeloop_arrays",
        "hand_arrays_xla",
    )
    overhead_line("defaults (in-memory): tapeloop_arrays vs fit", "tapeloop_arrays", "fit")
    overhead_line("tapeloop_arrays vs fit_spe100", "tapeloop_arrays", "fit_spe100")
    overhead_line("hand_loop_100 vs fit_spe100", "hand_loop_100", "fit_spe100")
    overhead_line("hand_loop (1 step/call) vs hand_loop_100", "hand_loop", "hand_loop_100")
    for name in ("pen_l2", "pen_selective_l2", "pen_decoupled_wd", "pen_l2+decoupled_wd"):
        overhead_line(f"penalty {name[4:]} vs none (tapeloop_arrays)", name, "tapeloop_arrays")
    for name in (
        "tapeloop_loop_only",
        "hand_100+run",
        "hand_100+run+loss",
        "hand_100+run+loss+acc",
        "hand_100+all+break",
    ):
        overhead_line(f"diagnostic {name} vs hand_loop_100", name, "hand_loop_100")
    overhead_line(
        "diagnostic tapeloop_arrays vs hand_arrays_xla_loss",
        "tapeloop_arrays",
        "hand_arrays_xla_loss",
    )
    overhead_line(
        "noise floor: hand_arrays_xla_twin vs hand_arrays_xla (identical)",
        "hand_arrays_xla_twin",
        "hand_arrays_xla",
    )
    overhead_line(
        "diagnostic tapeloop (train()) vs tapeloop_loop_only", "tapeloop", "tapeloop_loop_only"
    )
    overhead_line(
        "diagnostic tapeloop_loop_only vs hand_100+all+break",
        "tapeloop_loop_only",
        "hand_100+all+break",
    )
    if lines:
        print_(
            "overhead of A over B (t_A / t_B - 1; positive: A is slower): wall step time, "
            "median of the per-round pairs [their range]; A's best round against B's best; "
            "CPU time per step, median of the per-round pairs:"
        )
        for line in lines:
            print_(line)
    return summary


# ---- subprocess timings --------------------------------------------------------------------


def subprocess_timings(import_runs: int, print_=print) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    code = "import time;t=time.time();import trainer;print(time.time()-t)"
    times = []
    for _ in range(import_runs):
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True
        )
        if out.returncode != 0:
            print_(f"import trainer FAILED: {out.stderr.strip().splitlines()[-1:]}")
            break
        times.append(float(out.stdout.strip().splitlines()[-1]))
    if times:
        print_(
            f"import trainer (fresh subprocess, {len(times)} run(s)): median "
            f"{statistics.median(times):.2f} s [{min(times):.2f} .. {max(times):.2f}]"
        )
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "trainer"], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    tail = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    steps = next((ln for ln in reversed(tail) if "steps/s" in ln), "")
    print_(
        f"python -m trainer (default task, TF_CPP_MIN_LOG_LEVEL=2): wall {wall:.1f} s, "
        f"exit {out.returncode}"
        + (f"; last progress line: {steps.strip()[-110:]}" if steps else "")
    )


# ---- main ----------------------------------------------------------------------------------


def source_state() -> str:
    """The commit, and how many files of trainer/ differ from it (a benchmark of work in
    progress says so)."""
    try:
        head = subprocess.run(
            ["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", REPO_ROOT, "status", "--porcelain", "--", "trainer"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "no git"
    return f"commit {head}" + (f", {len(dirty)} uncommitted file(s) in trainer/" if dirty else "")


def workloads(quick: bool, repeats: int | None) -> list[Workload]:
    if quick:
        ws = [
            Workload("seed_mlp", "seed MLP 784-64(relu)-10", seed_mlp, (784,), 128, 4096, 200, 1,
                     penalties=True, diagnostics=True, matmul_calls=1),
            Workload("big_mlp", "compute-bound MLP 784-1024-1024-10", big_mlp, (784,), 256,
                     2048, 5, 1, matmul_calls=1),
            Workload("cnn", "small CNN 32x32x3 Conv32-Pool-Conv64-Pool-Dense128-10", small_cnn,
                     (32, 32, 3), 128, 1024, 5, 1, matmul_calls=1),
        ]  # fmt: skip
    else:
        ws = [
            Workload("seed_mlp", "seed MLP 784-64(relu)-10", seed_mlp, (784,), 128, 8192, 200, 10,
                     penalties=True, diagnostics=True, matmul_calls=2),
            Workload("big_mlp", "compute-bound MLP 784-1024-1024-10", big_mlp, (784,), 256,
                     8192, 40, 3, matmul_calls=2, first_steps=5),
            Workload("cnn", "small CNN 32x32x3 Conv32-Pool-Conv64-Pool-Dense128-10", small_cnn,
                     (32, 32, 3), 128, 4096, 20, 3, matmul_calls=2, first_steps=5),
        ]  # fmt: skip
    if repeats:
        for w in ws:
            w.repeats = repeats
    return ws


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1.5 minute smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per workload")
    parser.add_argument(
        "--workloads", default="seed_mlp,big_mlp,cnn", help="comma-separated subset"
    )
    parser.add_argument("--no-diagnostics", action="store_true", help="skip diagnostic variants")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="TensorFlow intra- and inter-op threads (default 0: TensorFlow's choice, one per "
        "core); 1 removes cross-thread wake-ups, for measuring small per-step overheads",
    )
    parser.add_argument(
        "--retry-budget",
        type=float,
        default=None,
        help="seconds that re-timing repetitions contended by other processes may add "
        "(default 60, 10 with --quick; 0 disables)",
    )
    parser.add_argument(
        "--no-subprocess", action="store_true", help="skip import / `python -m trainer` timings"
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    chosen = set(args.workloads.split(","))
    selected = [w for w in workloads(args.quick, args.repeats) if w.name in chosen]
    unknown = chosen - {w.name for w in workloads(True, None)}
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    # Each Trainer instance traces `Trainer._train_steps` once, which TensorFlow's retracing
    # detector (keyed by the method, not the instance) reports as "excessive retracing".
    # Real retraces are detected per variant (`tracing_count`) and flagged in the table.
    tf.get_logger().setLevel("ERROR")
    warnings.filterwarnings("ignore", message=".*shuffle=True.*")
    RETRIES.seconds = (
        args.retry_budget if args.retry_budget is not None else (10.0 if args.quick else 60.0)
    )
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"  ... {time.perf_counter() - t0:6.1f} s  {message}", file=sys.stderr, flush=True)

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(
        f"tapeloop benchmark: TF {tf.__version__}, Keras {keras.__version__}, Python "
        f"{platform.python_version()}, {cpu}, {os.cpu_count()} CPUs, "
        f"GPUs: {len(tf.config.list_physical_devices('GPU'))}; intra/inter-op threads: "
        f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}/"
        f"{tf.config.threading.get_inter_op_parallelism_threads() or 'default'}; "
        f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', '(unset)')}"
    )
    print(f"trainer from {os.path.dirname(trainer.__file__)} ({source_state()})")
    print(f"TrainerOptions fields: {', '.join(sorted(option_fields()))}")
    print("optimizer Adam(1e-3), sparse CE from logits, random in-memory data (pre-batched)")
    if not args.no_subprocess:
        log("subprocess timings")
        subprocess_timings(1 if args.quick else 3)
    for w in selected:
        results = measure_workload(w, not args.no_diagnostics, log)
        report_workload(w, results)
        del results
        keras.backend.clear_session()
    print()
    print(
        "x fit / x spe100: median per-round ratio of steps/s to fit / fit_spe100 (>1 = faster). "
        "CPU ms: this process's CPU time per step (all its threads), median. "
        "x floor: measured step time / (FLOPs per step / best sustained matmul GFLOP/s). "
        "~trace s: first call (100 steps, 5 on the big workloads; fit: one execution) minus "
        "its steps at the median rate. ops/step: graph ops in one "
        "iteration of the in-graph loop, before Grappler. cont.: repetitions during which "
        f"other processes used more than {CONTENDED_CORES} core (after re-timing)."
    )
    print(f"total benchmark wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
