"""Trainer: the task hooks, building, the per-replica GradientTape step, evaluation and state."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import keras
import tensorflow as tf
from absl import logging

from trainer.distribution import (
    check_jit_compile,
    gathers_in_graph,
    is_chief,
    is_default,
    make_strategy,
)
from trainer.errors import ConfigError
from trainer.inputs import InMemoryBatches, accepts_input_context, per_replica_batches
from trainer.optimizers import check_optimizer, learning_rate_for, make_optimizer, with_loss_scale
from trainer.options import TrainerOptions, options_with
from trainer.penalties.base import Penalty, check_loss_term
from trainer.penalties.coverage import Coverage, coverage, coverage_table
from trainer.run.controller import Controller, TrainResult
from trainer.run.hooks import Hooks
from trainer.run.keras_callbacks import check_callbacks
from trainer.step.chain import Chain, build_chain, techniques_line
from trainer.step.groups import ParamGroup, group_coverage, resolve_groups
from trainer.step.loop import TrainLoop


@dataclasses.dataclass(frozen=True)
class Built:
    """What `Trainer.build()` makes: the engine's parts, handed to the loop and controller.

    Attributes:
      model: the Keras model.
      optimizer: the optimizer (a `LossScaleOptimizer` under mixed_float16).
      variables: the trainable variables, in the gradients' order.
      selections: `(penalty, selected variables)` pairs, in the penalties' order.
      loss_penalties: the pairs of the penalties with a loss term.
      coverage: what acts on which variable (`penalties.coverage`), for the table.
      chain: the stages of one optimizer step (`chain.build_chain`).
      metrics: the task's evaluation metrics by name.
      loss_names: the loss breakdown's names: `loss`, `data_loss`, `penalty/<name>`, ...
      step_counter: the optimizer steps done (an int64 variable).
      replica_step: one step on one replica's batch as stored (preprocess, augment, then the
        chain).
      eval_step: one evaluation batch -> `[loss sum, examples]` (updates `metrics`).
      train_metrics: the task's metrics again, measured while training (streamed over each
        loop, per replica) when `options.train_eval_examples` is on; else empty.
    """

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    variables: list[Any]
    selections: list[tuple[Penalty, list[Any]]]
    loss_penalties: list[tuple[Penalty, list[Any]]]
    coverage: list[Coverage]
    chain: Chain
    metrics: dict[str, keras.metrics.Metric]
    loss_names: list[str]
    step_counter: tf.Variable
    replica_step: Callable[[Any], list[tf.Tensor]]
    eval_step: Callable[[Any], tf.Tensor]
    train_metrics: dict[str, keras.metrics.Metric] = dataclasses.field(default_factory=dict)


class Trainer(Hooks):
    """Trains a Keras model with a GradientTape step and pluggable penalties.

    Subclass it for a task: implement `build_model`, `train_dataset` (or `train_arrays`) and
    `compute_loss`; optionally `preprocess`, `augment`, `eval_dataset`, `build_metrics`,
    `build_optimizer`, `stored_spec` (what the export's default signature takes).
    Register it with `@register_task("name")` to run it from the CLI. Hooks (`hooks.Hooks`):
    `on_loop_end`, `on_evaluate`, `on_train_end`.

    One step (`train_step`): the model's outputs, per-example losses from `compute_loss`,
    their average over the global batch, plus every loss penalty and the model's own Keras
    regularizer losses (`model.losses`); gradients of that total; then decoupled penalties
    update their weights directly, and the optimizer applies the gradients. `train_loop`
    runs `steps_per_loop` steps inside one `tf.function`; `train()` hands the run (model_dir,
    checkpoints, evaluations, signals) to a `Controller`.

    Under a `tf.distribute` strategy each replica runs the step on its share of the global
    batch; the data loss is averaged over the global batch and penalties are divided by the
    number of replicas, so that each counts exactly once. A `train_dataset` that takes an
    `input_context` is built per worker (`distribute_datasets_from_function`, see
    `train_dataset`); the per-replica step is XLA-compiled on GPU replicas when `jit_compile`
    is None (`trainer.distribution.replica_jit_compile`).

    Args:
      options: a `TrainerOptions`; by default `make_options()`, the task's defaults.
      penalties: the penalties to apply.
      strategy: a `tf.distribute.Strategy`; by default made from `options.strategy`.
      callbacks: `trainer.run.callbacks.Callback`s and `keras.callbacks.Callback`s, called
        in this order after the run's own (see `controller.Controller`).
      param_groups: `ParamGroup`s (`LrMultiplier`, `Freeze`): per-group learning-rate
        multipliers on the optimizer's update, and frozen variables.

    Raises:
      ConfigError: `penalties` holds something else than a `Penalty`, `callbacks` something
        else than a callback, or `jit_compile=True` with several replicas on logical CPUs.

    What `build()` makes (model, optimizer, the step's stages, ...) is held in one `Built`
    object (`built`), not in attributes of the task: a task's own fields are never
    overwritten.
    """

    registered_name: ClassVar[str | None] = None
    # `TrainerOptions` fields this task sets differently: flags not given keep these.
    default_options: ClassVar[Mapping[str, Any]] = {}
    # The held-out metric a sweep ranks runs by, and whether lower ("min") or higher is better.
    sweep_metric: ClassVar[tuple[str, str]] = ("loss", "min")

    def __init__(
        self,
        options: TrainerOptions | None = None,
        *,
        penalties: Sequence[Penalty] = (),
        strategy: tf.distribute.Strategy | None = None,
        callbacks: Sequence[Any] = (),
        param_groups: Sequence[ParamGroup] = (),
    ):
        self.options = opts = options or self.make_options()
        self.strategy = strategy or make_strategy(
            opts.strategy, opts.cpu_replicas, peer_timeout=opts.peer_timeout
        )
        check_jit_compile(self.options.jit_compile, self.strategy)
        for p in penalties:
            if not isinstance(p, Penalty):
                raise ConfigError(f"`penalties` must hold Penalty objects, got {p!r}.")
        self.penalties = list(penalties)
        for g in param_groups:
            if not isinstance(g, ParamGroup):
                raise ConfigError(f"`param_groups` must hold ParamGroup objects, got {g!r}.")
        self.param_groups = list(param_groups)
        self.callbacks = check_callbacks(callbacks)
        self._check_augment_options()
        # The engine's parts, in name-mangled slots that a task's own fields cannot clash with.
        self.__built: Built | None = None
        self.__loop: TrainLoop | None = None
        self.__train_slice: tf.data.Dataset | None = None

    def _check_augment_options(self) -> None:
        """Refuses `label_smoothing` and `mixup_alpha` for a task whose `augment` is the
        default: nothing would apply them."""
        if type(self).augment is not Trainer.augment:
            return
        for name in ("label_smoothing", "mixup_alpha"):
            value = getattr(self.options, name)
            if value:
                raise ConfigError(
                    f"`{name}` ({value!r}) is not supported by task {type(self).__name__}: its "
                    "`augment` hook is the default, which applies no data regularization "
                    "(mnist and cifar10 apply it)."
                )

    @classmethod
    def make_options(cls, **overrides: Any) -> TrainerOptions:
        """`TrainerOptions` with this task's `default_options`, then `overrides`, applied.

        Raises:
          ConfigError: a key is not a `TrainerOptions` field, or a value is invalid.
        """
        return options_with(cls.default_options, overrides, owner=cls.__name__)

    # ---- hooks for tasks -------------------------------------------------------------

    def build_model(self) -> keras.Model:
        """Returns the model to train. Required."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_model().")

    def build_optimizer(self) -> keras.optimizers.Optimizer:
        """Returns the optimizer; by default `options.optimizer` at `options.learning_rate`,
        following `options.lr_schedule` and `warmup_steps`. An override that should follow
        them passes `trainer.learning_rate_for(self.options)` as its learning rate; one that
        does not, with a schedule asked for, is refused when the Trainer is built."""
        return make_optimizer(self.options.optimizer, learning_rate_for(self.options))

    def train_arrays(self) -> Any | None:
        """Returns the training data as in-memory arrays, e.g. `(x, y)`, or None (the default).

        When given, batches are drawn inside the train loop (a seeded reshuffle per epoch),
        which lets the whole multi-step loop run as one XLA computation: the fast path for data
        that fits in memory. Under MirroredStrategy and MultiWorkerMirroredStrategy each
        replica gathers its contiguous share of the same global batch in the loop (`batch_size`
        must divide by the replicas); other strategies (TPUs) get the same batches through the
        default `train_dataset`. `train_dataset` then need not be implemented.
        """
        return None

    def train_dataset(self, input_context: tf.distribute.InputContext | None = None) -> Any:
        """Returns batches of `(features, labels)` of `options.batch_size`, repeated.

        Required unless `train_arrays` is given; by default, `train_arrays`' batches.

        Under a strategy other than the default, a `train_dataset` that declares an
        `input_context` argument is called once per worker through
        `distribute_datasets_from_function` and returns that worker's per-replica batches
        (`input_context.get_per_replica_batch_size(batch_size)` examples each, its shard
        `input_context.input_pipeline_id` of `num_input_pipelines`); `per_replica_batches`
        cuts them from global batches, each replica a contiguous slice, so every step's
        global batch is the one-device one. One without the argument (`train_dataset(self)`)
        is called as before: its global batches are auto-sharded by
        `experimental_distribute_dataset`. Without a strategy `input_context` is None.
        """
        arrays = self.train_arrays()
        if arrays is None:
            raise NotImplementedError(
                f"{type(self).__name__} must implement train_dataset() or train_arrays()."
            )
        dataset = InMemoryBatches(arrays, self.options.batch_size, self.options.seed).dataset()
        return dataset if input_context is None else per_replica_batches(dataset, input_context)

    def preprocess(self, features: Any, labels: Any) -> tuple[Any, Any]:
        """Returns a batch as the model takes it, from one as stored; by default, unchanged.

        Applied in-graph to every batch trained on (`train_arrays`' or `train_dataset`'s,
        inside the step) and evaluated on: data stays compact (uint8 images), converted by batch.
        The export's default signature runs it too, with zero labels: the features it returns
        must not depend on the labels.
        """
        return features, labels

    def augment(self, features: Any, labels: Any) -> tuple[Any, Any]:
        """Returns a training batch with data regularization applied; by default, unchanged.

        Applied in-graph to training batches only, after `preprocess`, on each replica's
        share of the global batch (with accumulation, to the whole share before it is split
        into micro-batches); never to evaluation batches. For random draws, use stateless ops
        seeded by `augment_seed()`: a function of `options.seed`, the optimizer step and the
        replica, so that a resumed run draws what an uninterrupted one would.

        The options `label_smoothing` and `mixup_alpha` are applied by the tasks that override
        this hook (mnist and cifar10, with `trainer.augment.augment_classification`); a task
        that does not override it refuses them. An override returns the batch unchanged, with
        no op added, when its options are off.
        """
        return features, labels

    def eval_dataset(self) -> tf.data.Dataset | None:
        """Returns a finite dataset of `(features, labels)` batches, or None for no evaluation."""
        return None

    def stored_spec(self) -> Any:
        """Returns the `(features, labels)` `tf.TensorSpec`s of a batch as stored, batch size
        None: the export's default signature takes such features (`preprocess` turns them
        into the model's inputs). By default `eval_dataset()`'s element spec, or
        `train_dataset()`'s without one."""
        dataset = self.eval_dataset()
        spec = (dataset if dataset is not None else self.train_dataset()).element_spec
        return tf.nest.map_structure(lambda s: tf.TensorSpec([None, *s.shape[1:]], s.dtype), spec)

    def compute_loss(self, labels: Any, outputs: Any) -> tf.Tensor:
        """Returns the per-example losses, shape `[batch]`. Required."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss().")

    def build_metrics(self) -> dict[str, keras.metrics.Metric]:
        """Returns eval metrics by name, updated with `(labels, outputs)`; none by default."""
        return {}

    # ---- building ----------------------------------------------------------------------

    @property
    def built(self) -> Built:
        """What `build()` made (building on first access)."""
        if self.__built is None:
            self.build()
        return self.__built

    @property
    def model(self) -> keras.Model:
        """The model, built (with its penalties resolved) on first access."""
        return self.built.model

    @property
    def optimizer(self) -> keras.optimizers.Optimizer:
        """The optimizer (a `LossScaleOptimizer` under mixed_float16), built on first access."""
        return self.built.optimizer

    def build(self) -> None:
        """Seeds, builds the model, optimizer, metrics and the step's stages, and resolves
        every penalty's variables; a second call does nothing.

        Raises:
          ConfigError: a penalty's selection is empty or its regex matches nothing; two
            penalties share a name; a variable would be decayed twice.
        """
        if self.__built is not None:
            return
        names = [p.name for p in self.penalties]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(
                f"Two penalties are named {duplicates[0]!r}; pass name=... to tell them apart."
            )
        opts = self.options
        if opts.deterministic:
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(opts.seed)
        with self.strategy.scope():
            model = _build_model_with_policy(self)
            trainable = list(model.trainable_variables)
            selections = [(p, p.select(trainable)) for p in self.penalties]
            for penalty, variables in selections:
                penalty.build(variables)
            optimizer = with_loss_scale(self.build_optimizer(), opts.mixed_precision)
            check_optimizer(optimizer, opts, type(self).__name__)
            optimizer.build(trainable)  # before the first step: needed under strategies
            groups = resolve_groups(self.param_groups, trainable, selections)
            chain = build_chain(
                opts,
                optimizer,
                trainable,
                self.compute_losses,
                selections,
                model=model,
                train_batches=self._preprocessed_train_batches,
                groups=groups,
            )
            step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            # Updated inside the replicas: made under the scope, their sums reduce across them.
            train_metrics = self.build_metrics() if opts.train_eval_examples else {}
        covered = coverage(selections, optimizer, trainable)  # checks decays
        covered += group_coverage(groups)
        loss_penalties = [(p, v) for p, v in selections if p.has_loss]
        for penalty, variables in loss_penalties:  # once, eagerly: a bad term named here
            check_loss_term(penalty, penalty.loss(variables))
        use_function = opts.use_tf_function
        self.__built = Built(
            model=model,
            optimizer=optimizer,
            variables=trainable,
            selections=selections,
            loss_penalties=loss_penalties,
            coverage=covered,
            chain=chain,
            # Evaluation runs outside the replicas (cross-replica context), with plain metrics.
            metrics=self.build_metrics(),
            loss_names=(
                ["loss", "data_loss"]
                + [f"penalty/{p.name}" for p, _ in loss_penalties]
                + (["keras_regularizers"] if model.losses else [])
            ),
            step_counter=step_counter,
            replica_step=self._replica_step,
            eval_step=tf.function(self._evaluate_batch) if use_function else self._evaluate_batch,
            train_metrics=train_metrics,
        )
        logging.info(
            "%s on %s with %d replica(s); penalty coverage:\n%s",
            type(self).__name__,
            type(self.strategy).__name__,
            self.strategy.num_replicas_in_sync,
            self.penalty_table(),
        )

    def _preprocessed_train_batches(self) -> Iterator[Any]:
        """The training batches as the step takes them (`preprocess`ed, unaugmented), from a
        new `train_dataset()`: its first batches, whatever the training has reached (SWA's
        BatchNorm recalibration; training's own input is not touched)."""
        for batch in self.train_dataset():
            yield self.preprocess(*batch)

    @property
    def train_loop(self) -> TrainLoop:
        """The compiled multi-step loop (`loop.TrainLoop`), made on first access."""
        if self.__loop is None:
            arrays = self.train_arrays() if gathers_in_graph(self.strategy) else None
            self.__loop = TrainLoop(self.built, self.options, self.strategy, arrays)
        return self.__loop

    def penalty_table(self) -> str:
        """What covers each trainable variable (penalties, the optimizer's decay, Keras
        constraints, or nothing), then the techniques on and the step's stages in order."""
        built = self.built
        return (
            coverage_table(built.variables, built.coverage)
            + techniques_line(self.options)
            + "\nstep: "
            + built.chain.describe()
        )

    # ---- state -------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimizer steps trained so far (restored ones included)."""
        return 0 if self.__built is None else int(self.__built.step_counter.numpy())

    @property
    def is_chief(self) -> bool:
        """Whether this process writes results, summaries and exports."""
        return is_chief(self.strategy)

    def checkpoint_objects(self) -> dict[str, Any]:
        """What a checkpoint holds besides the model's variables and penalty state: the
        optimizer's variables but its learning rate (the rate given now is in force on
        resume), the step, and the stages' state (the EMA, keyed by weight path)."""
        built = self.built
        variables = built.optimizer.variables
        return {
            "optimizer_variables": [v for v in variables if not v.path.endswith("/learning_rate")],
            "step": built.step_counter,
            **built.chain.checkpoint_objects(),
        }

    def _state_variables(self) -> list[Any]:
        built = self.built
        return [
            *built.model.variables,
            *built.optimizer.variables,
            built.step_counter,
            *built.chain.state_variables(),
        ]

    def get_state(self) -> list[Any]:
        """The values of every model and optimizer variable and the step (for `set_state`)."""
        return [v.numpy() for v in self._state_variables()]

    def set_state(self, values: list[Any]) -> None:
        """Returns model, optimizer and step to values from `get_state`, without retracing."""
        for variable, value in zip(self._state_variables(), values, strict=True):
            variable.assign(value)

    def initial_model_values(self, seed: int) -> list[Any]:
        """The values of `model.variables` as a fresh build with `options.seed = seed` starts
        them (a sweep's seeds): `build_model()` under `keras.utils.set_random_seed(seed)`,
        outside the traced step. Leaves the global random seed at `seed`."""
        keras.utils.set_random_seed(seed)
        model = _build_model_with_policy(self)
        return [v.numpy() for v in model.variables]

    def evaluated_weights(self) -> contextlib.AbstractContextManager:
        """A context within which the model holds the weights evaluated and exported: the
        EMA's with `ema_decay`, SWA's (BatchNorm recalibrated) with `swa_every`, else the
        trained ones; these are put back after."""
        return self.built.chain.evaluated()

    # ---- the step ----------------------------------------------------------------------

    def compute_losses(
        self, features: Any, labels: Any, training: bool = True, record: bool = False
    ) -> list[tf.Tensor]:
        """The loss breakdown in `built.loss_names` order: total, data loss, each penalty term.

        Call it under a `GradientTape`: the total is what gradients are taken of. With
        `record`, the outputs also update `built.train_metrics` (the step's own pass, not
        SAM's second one); with `label_smoothing` or `mixup_alpha`, against the soft labels'
        dominant class.
        """
        built = self.built
        outputs = _float32(built.model(features, training=training))
        if record:
            targets = labels
            if self.options.label_smoothing or self.options.mixup_alpha:
                # The metrics take the labels as stored (class ids, as in evaluation): the
                # soft targets' dominant class, the true class under smoothing alone.
                targets = tf.argmax(labels, axis=-1, output_type=tf.int64)
            for metric in built.train_metrics.values():
                metric.update_state(targets, tf.stop_gradient(outputs))
        per_example = tf.cast(self.compute_loss(labels, outputs), tf.float32)
        if per_example.shape.rank != 1:
            raise ValueError(
                f"{type(self).__name__}.compute_loss must return per-example losses of shape "
                f"[batch], got shape {per_example.shape}."
            )
        data_loss = tf.nn.compute_average_loss(per_example)
        terms = [p.loss(v) for p, v in built.loss_penalties]
        if built.model.losses:
            terms.append(tf.add_n([tf.cast(x, tf.float32) for x in built.model.losses]))
        penalty = tf.add_n(terms) if terms else tf.constant(0.0)
        total = data_loss + tf.nn.scale_regularization_loss(penalty)
        return [total, data_loss, *terms]

    def augment_seed(self) -> tf.Tensor:
        """The stateless seed of this training step, for `augment`'s random ops: `[seed,
        step]` (`options.seed`, the optimizer's `iterations`, restored on resume), then, under
        a strategy with several replicas, folded with the replica's id so that each replica
        draws its own. An int64 tensor `[2]`; call it in-graph, inside `augment`.
        """
        step = tf.cast(self.built.optimizer.iterations, tf.int64)
        seed = tf.stack([tf.constant(self.options.seed, tf.int64), step])
        if self.strategy.num_replicas_in_sync > 1:
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            seed = tf.random.experimental.stateless_fold_in(seed, replica, alg="philox")
        return seed

    def _replica_step(self, batch: Any) -> list[tf.Tensor]:
        """One step on this replica's batch as stored: `preprocess`, `augment`, `train_step`."""
        return self.train_step(self.augment(*self.preprocess(*batch)))

    def train_step(self, batch: Any) -> list[tf.Tensor]:
        """One optimizer step on this replica's share of `batch` (preprocessed); returns the
        loss breakdown. The step is the chain of stages in `chain.build_chain`'s order."""
        return self.built.chain(batch)

    # ---- evaluation and training -------------------------------------------------------

    def _evaluate_batch(self, batch: Any) -> tf.Tensor:
        features, labels = self.preprocess(*batch)
        outputs = _float32(self.built.model(features, training=False))
        for metric in self.built.metrics.values():
            metric.update_state(labels, outputs)
        per_example = tf.cast(self.compute_loss(labels, outputs), tf.float32)
        return tf.stack([tf.reduce_sum(per_example), tf.cast(tf.size(per_example), tf.float32)])

    def evaluate(self, dataset: tf.data.Dataset | None = None) -> dict[str, float]:
        """Data loss (mean per example) and metrics over `dataset` (default `eval_dataset()`),
        whose batches go through `preprocess`, with the evaluated weights (`evaluated_weights`:
        the EMA under `ema_decay`, the SWA average under `swa_every`)."""
        built = self.built
        dataset = dataset if dataset is not None else self.eval_dataset()
        if dataset is None:
            return {}
        for metric in built.metrics.values():
            metric.reset_state()
        total = tf.zeros([2])
        with self.evaluated_weights():  # the EMA or SWA average, when on
            for batch in dataset:
                total += built.eval_step(batch)
        loss_sum, count = total.numpy()
        results = {"loss": float(loss_sum / max(count, 1.0))}
        results.update({k: float(m.result()) for k, m in built.metrics.items()})
        return results

    def train_slice(self) -> tf.data.Dataset | None:
        """The first `options.train_eval_examples` training examples as stored, in batches of
        at most `batch_size`: from `train_arrays`, else from a new `train_dataset()`, read
        once and kept, so that every evaluation sees the same examples. None when off."""
        n = self.options.train_eval_examples
        if not n:
            return None
        if self.__train_slice is None:
            arrays = self.train_arrays()
            if arrays is not None:
                first = tf.nest.map_structure(lambda a: a[:n], arrays)
            else:
                first = next(iter(self.train_dataset().unbatch().batch(n).take(1)))
                first = tf.nest.map_structure(lambda t: t.numpy(), first)
            examples = tf.data.Dataset.from_tensor_slices(first)
            self.__train_slice = examples.batch(self.options.batch_size)
        return self.__train_slice

    def evaluate_train_slice(self) -> dict[str, float]:
        """`evaluate` on `train_slice()` (data loss and metrics, with the evaluated weights);
        empty when `options.train_eval_examples` is 0."""
        dataset = self.train_slice()
        return {} if dataset is None else self.evaluate(dataset)

    def train_batches(self, skip: int = 0) -> Any:
        """`train_dataset`'s batches from step `skip` on, distributed over the replicas.

        Per worker (`distribute_datasets_from_function`) when `train_dataset` takes an
        `input_context` and a strategy is set: each worker skips `skip` steps' worth of its
        per-replica batches, so a resumed run continues every shard where it stopped.
        Otherwise `distribute(train_dataset().skip(skip))`, as before.
        """
        if is_default(self.strategy) or not accepts_input_context(self.train_dataset):
            return self.distribute(self.train_dataset().skip(skip))

        def worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
            per_worker = context.num_replicas_in_sync // context.num_input_pipelines
            return self.train_dataset(input_context=context).skip(skip * per_worker)

        return self.strategy.distribute_datasets_from_function(worker)

    def distribute(self, dataset: tf.data.Dataset) -> Any:
        """`dataset` (global batches) split across the strategy's replicas."""
        if is_default(self.strategy):
            return dataset
        return self.strategy.experimental_distribute_dataset(dataset)

    def train(self) -> TrainResult:
        """Trains to `options.train_steps`, resuming from `model_dir`'s checkpoint if any.

        See `controller.Controller.train`: evaluations, checkpoints, SIGTERM, results.
        """
        return Controller(self).train()


def _float32(outputs: Any) -> Any:
    """Float outputs in float32: under mixed precision the loss is computed in full precision."""
    return tf.nest.map_structure(
        lambda t: tf.cast(t, tf.float32) if t.dtype.is_floating else t, outputs
    )


def _build_model_with_policy(trainer: Trainer) -> keras.Model:
    """`trainer.build_model()` under `options.mixed_precision`, called once on a batch of
    zeros shaped like a training batch (through `trainer.preprocess`) if it has no weights
    yet."""
    policy = trainer.options.mixed_precision
    previous = keras.mixed_precision.global_policy()
    if policy:
        keras.mixed_precision.set_global_policy(policy)
    try:
        model = trainer.build_model()
        if not model.built or not model.trainable_variables:
            spec = trainer.train_dataset().element_spec
            zeros = lambda s: tf.zeros([d or 1 for d in s.shape], s.dtype)  # noqa: E731
            model(trainer.preprocess(*tf.nest.map_structure(zeros, spec))[0])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return model
