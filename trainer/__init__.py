"""tapeloop: custom TensorFlow 2 training loops with regularization done right."""

from trainer.errors import ConfigError
from trainer.penalties import L2, DecoupledWeightDecay, Penalty, SelectiveL2, StepContext, Strength
from trainer.registry import (
    get_penalty,
    get_task,
    parse_penalty_spec,
    penalty_names,
    register_penalty,
    register_task,
    task_names,
)
from trainer.trainer import Preempted, Trainer, TrainerOptions

__all__ = [
    "L2",
    "ConfigError",
    "DecoupledWeightDecay",
    "Penalty",
    "Preempted",
    "SelectiveL2",
    "StepContext",
    "Strength",
    "Trainer",
    "TrainerOptions",
    "get_penalty",
    "get_task",
    "parse_penalty_spec",
    "penalty_names",
    "register_penalty",
    "register_task",
    "task_names",
]
