"""The optimizer step as one ordered chain of stages: the order is written once, here.

One optimizer step on one replica, in this order (`build_chain`):

0. strength schedules        `StrengthSchedules`: each scheduled penalty strength's value for
                             this step, written into its variable (only with a schedule)
1. loss terms and gradients  `Gradients`: data loss (averaged over the global batch) + each
                             penalty's `loss()` + the model's Keras regularizer losses, over
                             `accumulate_steps` micro-batches; penalties count once per step
2. gradient transforms       `SharpnessAware`: the gradients again at w + ε, weights restored
                             (SAM/ASAM, `sam_rho`, `sam_adaptive`); `Clipping`: the global
                             norm over all replicas (`clip_global_norm`)
3. before the update         `GroupSnapshot`: the parameter groups' weights, read; then
                             `PenaltyUpdates`: each penalty's `update()` (decoupled weight decay)
4. the update                `OptimizerUpdate`: `optimizer.apply_gradients` (Keras constraints
                             on the model's variables are applied there, as in `fit`); then
                             `GroupScaling`: each group's move since the snapshot times its
                             multiplier (`lr_multiplier`), or undone (`freeze`)
5. after the update          `Projections`: each penalty's `project()` (max_norm, ...); then
                             `ExponentialAverage`: the EMA of the weights (`ema_decay`), or
                             `StochasticWeightAverage`: SWA (`swa_every`, `swa_start`)

A stage that is off is not in the chain, so it adds no op to the compiled step. A step that a
`LossScaleOptimizer` skips (non-finite gradients) skips stages 3 to 5.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf

from trainer.errors import ConfigError
from trainer.step.accumulation import Gradients
from trainer.step.clipping import Clipping
from trainer.step.decay import PenaltyUpdates
from trainer.step.ema import ExponentialAverage
from trainer.step.groups import GroupScaling, GroupSnapshot
from trainer.step.projection import Projections
from trainer.step.sam import SharpnessAware
from trainer.step.schedules import StrengthSchedules
from trainer.step.stage import PHASES, Stage, StepState
from trainer.step.swa import StochasticWeightAverage
from trainer.step.update import OptimizerUpdate


class Chain:
    """The stages of one optimizer step, run in the order of `PHASES`.

    Args:
      stages: the stages that are on, in order.

    Raises:
      ConfigError: a stage of an unknown phase, or stages out of the phases' order.
    """

    def __init__(self, stages: Sequence[Stage]):
        order = []
        for stage in stages:
            if stage.phase not in PHASES:
                raise ConfigError(
                    f"{type(stage).__name__}.phase ({stage.phase!r}) must be one of {PHASES}."
                )
            order.append(PHASES.index(stage.phase))
        if order != sorted(order):
            names = ", ".join(f"{type(s).__name__} ({s.phase})" for s in stages)
            raise ConfigError(f"Stages out of order: {names}; the order is {PHASES}.")
        self.stages = list(stages)

    def __call__(self, batch: Any) -> list[tf.Tensor]:
        """One optimizer step on this replica's preprocessed `batch`; returns the losses."""
        state = StepState(batch)
        for stage in self.stages:
            stage(state)
        return state.losses

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def stage(self, kind: type[Stage]) -> Any:
        """The first stage that is a `kind`, or None when no such stage is on."""
        return next((s for s in self.stages if isinstance(s, kind)), None)

    def describe(self) -> str:
        """The stages in order, one line: `gradients -> clip_global_norm=1 -> ...`."""
        return " -> ".join(d for d in (s.describe() for s in self.stages) if d)

    def checkpoint_objects(self) -> dict[str, Any]:
        """Every stage's checkpointed state."""
        objects: dict[str, Any] = {}
        for stage in self.stages:
            objects.update(stage.checkpoint_objects())
        return objects

    def state_variables(self) -> list[tf.Variable]:
        """Every stage's `state_variables`, in order."""
        return [v for stage in self.stages for v in stage.state_variables()]

    def summary_tags(self) -> list[str]:
        """Every stage's extra TensorBoard tags, in order."""
        return [tag for stage in self.stages for tag in stage.summary_tags()]

    def summary_values(self) -> list[tf.Tensor]:
        """The values for `summary_tags`."""
        return [value for stage in self.stages for value in stage.summary_values()]

    @contextlib.contextmanager
    def evaluated(self) -> Iterator[None]:
        """Within it, the model holds the weights evaluated and exported (see `Stage`)."""
        with contextlib.ExitStack() as stack:
            for stage in self.stages:
                stack.enter_context(stage.evaluated())
            yield


def build_chain(
    options: Any,
    optimizer: keras.optimizers.Optimizer,
    variables: Sequence[Any],
    compute_losses: Callable[..., list[tf.Tensor]],
    selections: Sequence[tuple[Any, list[Any]]],
    *,
    model: keras.Model | None = None,
    train_batches: Callable[[], Iterable[Any]] | None = None,
    groups: Sequence[tuple[Any, list[Any]]] = (),
) -> Chain:
    """The step's stages in the framework's order, those that are on.

    Args:
      options: the `TrainerOptions`.
      optimizer: the built optimizer (possibly a `LossScaleOptimizer`).
      variables: the trainable variables, in the gradients' order.
      compute_losses: `(features, labels) -> [total, data loss, *terms]` under a tape.
      selections: `(penalty, selected variables)` pairs, in the penalties' order.
      model: the model (SWA recalibrates its BatchNorm statistics); needed with `swa_every`.
      train_batches: returns the training batches as the step takes them (preprocessed),
        from the first (SWA's recalibration); needed with `swa_every`.
      groups: `(parameter group, selected variables)` pairs (`groups.resolve_groups`).
    """
    before = [(p, v) for p, v in selections if p.has_update]
    after = [(p, v) for p, v in selections if p.has_project]
    ema = options.ema_decay
    gradients = Gradients(
        compute_losses,
        optimizer,
        variables,
        options.accumulate_steps,
        record=bool(getattr(options, "train_eval_examples", 0)),  # training metrics
    )
    rho = options.sam_rho
    swa = None
    if options.swa_every:
        swa = StochasticWeightAverage(
            options.swa_start,
            options.swa_every,
            optimizer,
            variables,
            model=model,
            batches=train_batches,
            bn_batches=options.swa_bn_batches,
            use_tf_function=options.use_tf_function,
        )
    scheduled = [p for p, _ in selections if p.schedules]
    stages = [
        StrengthSchedules(scheduled, optimizer, options.train_steps) if scheduled else None,
        gradients,
        SharpnessAware(gradients, rho, options.sam_adaptive) if rho else None,
        Clipping(options.clip_global_norm, optimizer) if options.clip_global_norm else None,
        GroupSnapshot(groups) if groups else None,
        PenaltyUpdates(before, optimizer) if before else None,
        OptimizerUpdate(optimizer, variables, record_iterations=bool(after or ema or swa)),
        GroupScaling(groups) if groups else None,
        Projections(after, optimizer) if after else None,
        ExponentialAverage(ema, optimizer, variables) if ema else None,
        swa,
    ]
    return Chain([s for s in stages if s is not None])


def techniques_line(options: Any) -> str:
    """A line of the techniques the options turn on ("" when none), for the start-up table."""
    o = options
    parts = []
    if o.lr_schedule != "constant" or o.warmup_steps:
        parts.append(
            f"lr_schedule={o.lr_schedule} (warmup {o.warmup_steps} steps to "
            f"{o.learning_rate:g}, {o.end_learning_rate:g} at step {o.train_steps})"
        )
    if o.label_smoothing or o.mixup_alpha:  # applied by the task's `augment`
        parts.append(
            f"label_smoothing={o.label_smoothing:g}, mixup_alpha={o.mixup_alpha:g} "
            "(training batches only)"
        )
    if o.sam_rho:
        name = "asam" if o.sam_adaptive else "sam"
        parts.append(f"{name}_rho={o.sam_rho:g} (two gradient passes per step)")
    if o.clip_global_norm:
        parts.append(f"clip_global_norm={o.clip_global_norm:g}")
    if o.accumulate_steps > 1:
        parts.append(
            f"accumulate_steps={o.accumulate_steps} (micro-batches of "
            f"{o.batch_size // o.accumulate_steps})"
        )
    if o.ema_decay:
        parts.append(f"ema_decay={o.ema_decay:g} (evaluation and export use the EMA)")
    if o.swa_every:
        parts.append(
            f"swa_every={o.swa_every} after step {o.swa_start} (evaluation and export use the "
            f"average; BatchNorm statistics, if any, recomputed over {o.swa_bn_batches} batches)"
        )
    return "\ntechniques: " + ", ".join(parts) if parts else ""
