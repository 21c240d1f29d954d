"""Penalties: the base class, the built-ins and projections, selection by name, the coverage table.

Importing this package registers the built-in penalties (the `trainer.penalties` entry point).
"""

from trainer.penalties.base import Penalty, StepContext, Strength, check_loss_term
from trainer.penalties.builtin import L2, DecoupledWeightDecay, SelectiveL2
from trainer.penalties.projections import MaxNorm, NonNeg, UnitNorm
from trainer.penalties.schedules import StrengthSchedule
from trainer.penalties.selection import Selector, variable_path

__all__ = [
    "L2",
    "DecoupledWeightDecay",
    "MaxNorm",
    "NonNeg",
    "Penalty",
    "SelectiveL2",
    "Selector",
    "StepContext",
    "Strength",
    "StrengthSchedule",
    "UnitNorm",
    "check_loss_term",
    "variable_path",
]
