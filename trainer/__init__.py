"""tapeloop: custom TensorFlow 2 training loops with regularization done right.

The public names below are imported on first use: `import trainer` alone imports no
TensorFlow, so that `python -m trainer` can end a Ctrl-C during start-up with one line.
The first public name used imports them all, as an eager `__init__` would.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time, `__getattr__` below
    from trainer.augment import (
        augment_classification,
        mixup,
        mixup_draws,
        smooth_labels,
        stateless_log_gamma,
    )
    from trainer.cli.registry import (
        get_param_group,
        get_penalty,
        get_task,
        param_group_names,
        parse_param_group_spec,
        parse_penalty_spec,
        penalty_names,
        register_param_group,
        register_penalty,
        register_task,
        task_names,
    )
    from trainer.errors import ConfigError
    from trainer.inputs import per_replica_batches, read_to_memory
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
        StrengthSchedule,
        UnitNorm,
    )
    from trainer.run.callbacks import Callback
    from trainer.run.controller import Controller, Preempted, TrainResult
    from trainer.run.export import export_saved_model
    from trainer.step.groups import Freeze, LayerwiseLrDecay, LrMultiplier, ParamGroup
    from trainer.step.loop import TrainLoop
    from trainer.step.trainer import Trainer

# Each public name's module, in the order they are imported.
_MODULES = {
    "trainer.augment": (
        "augment_classification",
        "mixup",
        "mixup_draws",
        "smooth_labels",
        "stateless_log_gamma",
    ),
    "trainer.cli.registry": (
        "get_param_group",
        "get_penalty",
        "get_task",
        "param_group_names",
        "parse_param_group_spec",
        "parse_penalty_spec",
        "penalty_names",
        "register_param_group",
        "register_penalty",
        "register_task",
        "task_names",
    ),
    "trainer.errors": ("ConfigError",),
    "trainer.inputs": ("per_replica_batches", "read_to_memory"),
    "trainer.optimizers": ("WarmupSchedule", "learning_rate_for", "make_optimizer"),
    "trainer.options": ("TrainerOptions",),
    "trainer.penalties": (
        "L2",
        "DecoupledWeightDecay",
        "MaxNorm",
        "NonNeg",
        "Penalty",
        "SelectiveL2",
        "StepContext",
        "Strength",
        "StrengthSchedule",
        "UnitNorm",
    ),
    "trainer.run.callbacks": ("Callback",),
    "trainer.run.controller": ("Controller", "Preempted", "TrainResult"),
    "trainer.run.export": ("export_saved_model",),
    "trainer.step.groups": ("Freeze", "LayerwiseLrDecay", "LrMultiplier", "ParamGroup"),
    "trainer.step.loop": ("TrainLoop",),
    "trainer.step.trainer": ("Trainer",),
}

__all__ = [
    "L2",
    "Callback",
    "ConfigError",
    "Controller",
    "DecoupledWeightDecay",
    "Freeze",
    "LayerwiseLrDecay",
    "LrMultiplier",
    "MaxNorm",
    "NonNeg",
    "ParamGroup",
    "Penalty",
    "Preempted",
    "SelectiveL2",
    "StepContext",
    "Strength",
    "StrengthSchedule",
    "TrainLoop",
    "TrainResult",
    "Trainer",
    "TrainerOptions",
    "UnitNorm",
    "WarmupSchedule",
    "augment_classification",
    "export_saved_model",
    "get_param_group",
    "get_penalty",
    "get_task",
    "learning_rate_for",
    "make_optimizer",
    "mixup",
    "mixup_draws",
    "param_group_names",
    "parse_param_group_spec",
    "parse_penalty_spec",
    "penalty_names",
    "per_replica_batches",
    "read_to_memory",
    "register_param_group",
    "register_penalty",
    "register_task",
    "smooth_labels",
    "stateless_log_gamma",
    "task_names",
]


def __getattr__(name: str) -> Any:
    """A public name, all of them imported on the first (the built-in penalties register
    then); else a submodule, imported."""
    if name in __all__:
        for module, names in _MODULES.items():
            imported = importlib.import_module(module)
            globals().update({n: getattr(imported, n) for n in names})
        return globals()[name]
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
