"""What the controller and its callbacks use of a trainer: the seam between the step and the run."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import keras
import tensorflow as tf

if TYPE_CHECKING:  # annotations only: the step's modules import the controller, which imports this
    from trainer.options import TrainerOptions
    from trainer.penalties.base import Penalty


class Loop(Protocol):
    """The compiled multi-step loop (`step.loop.TrainLoop`), as the controller drives it."""

    @property
    def in_memory(self) -> bool:
        """Whether batches are drawn inside the loop (no iterator is passed to `run`)."""

    @property
    def writer(self) -> tf.summary.SummaryWriter | None:
        """Where the run's TensorBoard scalars go; None when none are written."""

    @property
    def input_wait_s(self) -> float | None:
        """The last `run`'s seconds spent waiting for input; None when not measured."""

    def run(self, num_steps: int, iterator: Any = None) -> tuple[dict[str, float], int]:
        """Runs `num_steps` steps; returns the mean loss breakdown and the step reached."""

    def set_summary_dir(self, directory: str | None) -> bool:
        """Writes summaries to `directory` (None: none); returns whether a writer is open."""


class Runnable(Protocol):
    """Everything the controller (`controller.Controller`) and the built-in callbacks read of
    a trainer, and nothing else: `step.trainer.Trainer` is one; so is any object with these
    members (a test runs the controller on a proxy that has only them)."""

    @property
    def options(self) -> TrainerOptions:
        """The run's options."""

    @property
    def strategy(self) -> tf.distribute.Strategy:
        """The distribution strategy; under several workers, stops are agreed over it."""

    @property
    def penalties(self) -> Sequence[Penalty]:
        """The penalties, whose state and parameters the checkpoint records."""

    @property
    def callbacks(self) -> Sequence[Any]:
        """The user's callbacks: `callbacks.Callback`s or `keras.callbacks.Callback`s."""

    @property
    def sweep_metric(self) -> tuple[str, str]:
        """The held-out metric and whether lower ("min") or higher ("max") is better."""

    @property
    def registered_name(self) -> str | None:
        """The task's registered name, recorded with its checkpoints."""

    @property
    def step(self) -> int:
        """Optimizer steps trained so far."""

    @property
    def is_chief(self) -> bool:
        """Whether this process writes results, summaries and exports."""

    @property
    def model(self) -> keras.Model:
        """The model, built."""

    @property
    def optimizer(self) -> keras.optimizers.Optimizer:
        """The optimizer, built; a rollback lowers its learning rate."""

    @property
    def train_loop(self) -> Loop:
        """The compiled loop."""

    def train_dataset(self) -> tf.data.Dataset:
        """The training batches, repeated (unless the loop is `in_memory`)."""

    def preprocess(self, features: Any, labels: Any) -> tuple[Any, Any]:
        """A batch as the model takes it, from one as stored (the export runs it)."""

    def stored_spec(self) -> Any:
        """The `(features, labels)` specs of a batch as stored: the export's default input."""

    def distribute(self, dataset: tf.data.Dataset) -> Any:
        """`dataset` split across the strategy's replicas."""

    def evaluate(self) -> dict[str, float]:
        """The held-out metrics; empty without an eval dataset."""

    def evaluate_train_slice(self) -> dict[str, float]:
        """The same metrics on the fixed training slice; empty when `train_eval_examples` is 0."""

    def penalty_table(self) -> str:
        """What covers each trainable variable, for TensorBoard's text tab."""

    def checkpoint_objects(self) -> dict[str, Any]:
        """What a checkpoint holds besides the model's variables and penalty state."""

    def get_state(self) -> list[Any]:
        """The values a rollback returns to (`set_state`)."""

    def set_state(self, values: list[Any]) -> None:
        """Returns the model, optimizer and step to `values` from `get_state`."""

    def evaluated_weights(self) -> AbstractContextManager[None]:
        """Within it, the model holds the weights that are evaluated and exported."""
