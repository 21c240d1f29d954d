"""tapeloop: custom TensorFlow 2 training loops with regularization done right."""

from trainer.cli.registry import (
    get_penalty,
    get_task,
    parse_penalty_spec,
    penalty_names,
    register_penalty,
    register_task,
    task_names,
)
from trainer.errors import ConfigError
from trainer.inputs import read_to_memory
from trainer.optimizers import WarmupSchedule, learning_rate_for, make_optimizer
from trainer.options import TrainerOptions
from trainer.penalties import (
    L2,
    DecoupledWeightDecay,
    MaxNorm,
    NonNeg,
    Penalty,
    SelectiveL2,
    StepContext,
    Strength,
    UnitNorm,
)
from trainer.run.callbacks import Callback
from trainer.run.controller import Controller, Preempted, TrainResult
from trainer.step.loop import TrainLoop
from trainer.step.trainer import Trainer

__all__ = [
    "L2",
    "Callback",
    "ConfigError",
    "Controller",
    "DecoupledWeightDecay",
    "MaxNorm",
    "NonNeg",
    "Penalty",
    "Preempted",
    "SelectiveL2",
    "StepContext",
    "Strength",
    "TrainLoop",
    "TrainResult",
    "Trainer",
    "TrainerOptions",
    "UnitNorm",
    "WarmupSchedule",
    "get_penalty",
    "get_task",
    "learning_rate_for",
    "make_optimizer",
    "parse_penalty_spec",
    "penalty_names",
    "read_to_memory",
    "register_penalty",
    "register_task",
    "task_names",
]
