"""The timed variants: hand-written loops, `fit`, tapeloop Trainers, matmuls; `variants_for`."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from workloads import LEARNING_RATE, ArraysBenchTask, BenchTask, Workload, hand_setup, new_optimizer

from trainer import L2, DecoupledWeightDecay, Freeze, LrMultiplier, SelectiveL2, TrainerOptions

MATMUL_N = 2048


def sync(model: keras.Model) -> None:
    """Waits for the step's updates: reads one weight back."""
    model.trainable_variables[-1].numpy()


def calls(n: int, per_call: int) -> list[int]:
    """`n` steps as the step counts of successive calls of at most `per_call` steps."""
    full, rest = divmod(n, per_call)
    return [per_call] * full + ([rest] if rest else [])


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

    def loop_function(self) -> Any | None:
        """The concrete function of the in-graph loop, when there is one (for counting the
        ops of its body: `harness.while_body_ops`)."""
        return None


class HandLoop(Variant):
    """The corrected Example 3 step, called once per batch or `per_call` times in one call.

    `extras` adds tapeloop's work one piece at a time (diagnostics):
      strategy_run: the step runs through `strategy.run` of the default strategy, its losses
        through `strategy.reduce` (as tapeloop's `TrainLoop` does);
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
            for k in calls(n, self.steps_per_call):
                self.fn(iterator, tf.constant(k, tf.int32))
        sync(self.model)

    def tracing_count(self) -> int:
        return self.fn.experimental_get_tracing_count()

    def loop_function(self) -> Any | None:
        if self.steps_per_call == 1:
            return None
        return self.fn.get_concrete_function(iter(self.workload.dataset), tf.constant(1, tf.int32))


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
        for k in calls(n, self.steps_per_call):
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


def option_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainerOptions)}


class Tapeloop(Variant):
    """A `BenchTask` timed through `train()` (see compare.py's docstring), or, with
    `loop_only`, through `trainer.train_loop.run` alone."""

    def __init__(
        self,
        name,
        workload,
        options=None,
        penalties=list,
        group="main",
        loop_only=False,
        task=BenchTask,
        param_groups=list,
    ):
        super().__init__(name, workload)
        self.param_group_factory = param_groups
        self.task = task
        self.in_graph_loop = True
        self.extra_options = {k: v for k, v in (options or {}).items() if k in option_fields()}
        self.penalty_factory = penalties
        self.group = group
        self.loop_only = loop_only

    def build(self) -> None:
        options = TrainerOptions(
            **{
                "batch_size": self.workload.batch_size,
                "train_steps": 1,
                "learning_rate": LEARNING_RATE,
                "optimizer": "adam",
                **self.extra_options,
            }
        )
        self.steps_per_call = min(options.steps_per_loop, self.workload.steps)
        self.trainer = self.task(
            self.workload,
            options,
            penalties=self.penalty_factory(),
            param_groups=self.param_group_factory(),
        )
        self.model = self.trainer.model  # builds: model, optimizer, penalties
        self.note = ", ".join(f"{k}={v}" for k, v in self.extra_options.items()) or "defaults"
        if self.trainer.penalties:
            self.note = " + ".join(repr(p) for p in self.trainer.penalties)
        if self.trainer.param_groups:
            self.note = " + ".join(repr(g) for g in self.trainer.param_groups)
        if self.loop_only:
            self.note = "trainer.train_loop.run(n, iterator) only, no train()"
        if self.task is ArraysBenchTask:
            self.note = f"train_arrays(), {self.note}"

    def _iterator(self) -> Any:
        """What `train()` passes the loop: None when it batches `train_arrays()` itself."""
        return None if self.trainer.train_loop.in_memory else iter(self.workload.dataset)

    def run(self, n: int) -> None:
        t = self.trainer
        if self.loop_only:
            iterator = self._iterator()
            for k in calls(n, self.steps_per_call):
                t.train_loop.run(k, iterator)
            sync(self.model)
            return
        t.options = dataclasses.replace(t.options, train_steps=t.step + n)
        t.train()

    def tracing_count(self) -> int:
        return self.trainer.train_loop.trace_counts()["loop"]

    def loop_function(self) -> Any:
        # Traced for the argument train() passes (another value would trace another function).
        return self.trainer.train_loop.concrete_function(self._iterator())


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


# The penalty variants (seed MLP): tapeloop_arrays with each of these.
PENALTIES = (
    ("pen_l2", lambda: [L2(1e-4)]),
    ("pen_selective_l2", lambda: [SelectiveL2(1e-4, exclude="bias")]),
    ("pen_decoupled_wd", lambda: [DecoupledWeightDecay(1e-2)]),
    ("pen_l2+decoupled_wd", lambda: [L2(1e-4), DecoupledWeightDecay(1e-2)]),
    ("pen_l2_cosine", lambda: [L2(1e-4, schedule="cosine(end=1e-5)")]),  # strength schedule
)
# The technique variants (seed MLP): tapeloop_arrays with each option on (batch 128).
TECHNIQUES = (
    ("tech_cosine_warmup", {"lr_schedule": "cosine", "warmup_steps": 100, "train_steps": 10**6}),
    ("tech_clip", {"clip_global_norm": 1.0}),
    ("tech_accumulate_2", {"accumulate_steps": 2}),
    ("tech_ema", {"ema_decay": 0.99}),
    ("tech_sam", {"sam_rho": 0.05}),
    ("tech_asam", {"sam_rho": 0.5, "sam_adaptive": True}),
    ("tech_swa", {"swa_every": 10}),
)
# The parameter-group variants (seed MLP): tapeloop_arrays with these groups (every variable
# in one: the most work; paths by kind, as layer names vary within a process).
GROUPS = (
    (
        "tech_param_groups",
        lambda: [LrMultiplier(0.1, include="kernel"), Freeze(include="bias")],
    ),
)


class MetricsBenchTask(ArraysBenchTask):
    """`ArraysBenchTask` with an accuracy metric: with `train_eval_examples`, streamed in
    the loop (the cost of the training metrics; the slice's evaluation is an evaluation's)."""

    def build_metrics(self):
        return {"accuracy": keras.metrics.SparseCategoricalAccuracy()}


# The diagnostic hand loops: hand_loop_100 plus tapeloop's extra work, each row adding its
# `HandLoop` extra to the previous row's.
HAND_DIAGNOSTICS = (
    ("hand_100+run", "strategy_run", "+ strategy.run / strategy.reduce (default strategy)"),
    ("hand_100+run+loss", "loss_path",
     "+ tapeloop's loss path (cast, per-example, compute_average_loss)"),
    ("hand_100+run+loss+acc", "accumulate",
     "+ loss sums, count, int64 step accumulated in tf.Variables"),
    ("hand_100+all+break", "finite_break", "+ `if not all(isfinite(losses)): break` each step"),
)  # fmt: skip


def variants_for(w: Workload, diagnostics: bool) -> list[Variant]:
    """The variants timed on `w`, in table order (`diagnostics`: with the diagnostic ones)."""
    spc = w.steps_per_call
    fast = {"steps_per_loop": w.steps}
    if "jit_compile" in option_fields():
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
        variants += [
            Tapeloop(name, w, penalties=make, group="penalty", task=ArraysBenchTask)
            for name, make in PENALTIES
        ]
    if w.penalties:  # the seed MLP: also each technique's cost
        variants += [
            Tapeloop(name, w, options=options, group="technique", task=ArraysBenchTask)
            for name, options in TECHNIQUES
        ]
        variants += [
            Tapeloop(name, w, param_groups=make, group="technique", task=ArraysBenchTask)
            for name, make in GROUPS
        ]
        variants.append(
            Tapeloop("tech_train_metrics", w, options={"train_eval_examples": 1024},
                     group="technique", task=MetricsBenchTask)
        )  # fmt: skip
    if diagnostics and w.diagnostics and w.name != "cnn":
        variants += [
            HandArraysXla("hand_arrays_xla_loss", w, per_call=spc, track_loss=True,
                          group="diagnostic",
                          note="+ returns the mean loss (its value no longer pruned by XLA)"),
            HandArraysXla("hand_arrays_xla_twin", w, per_call=spc, group="diagnostic",
                          note="a second, identical hand_arrays_xla: the noise floor of the "
                          "comparison"),
        ]  # fmt: skip
    if diagnostics and w.diagnostics:
        variants.append(
            Tapeloop("tapeloop_loop_only", w, options={"steps_per_loop": spc},
                     group="diagnostic", loop_only=True)
        )  # fmt: skip
        extras: set[str] = set()
        for name, extra, note in HAND_DIAGNOSTICS:
            extras.add(extra)
            variants.append(
                HandLoop(name, w, per_call=spc, extras=set(extras), group="diagnostic", note=note)
            )
    variants += [Matmul("matmul", w), Matmul("matmul_xla", w, jit_compile=True)]
    return variants
