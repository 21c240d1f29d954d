"""Penalties: the base class, the built-ins, selection by name and the coverage table.

Importing this package registers the built-in penalties (the `trainer.penalties` entry point).
"""

from trainer.penalties.base import Penalty, StepContext, Strength, check_loss_term
from trainer.penalties.builtin import L2, DecoupledWeightDecay, SelectiveL2
from trainer.penalties.selection import Selector, variable_path

__all__ = [
    "L2",
    "DecoupledWeightDecay",
    "Penalty",
    "SelectiveL2",
    "Selector",
    "StepContext",
    "Strength",
    "check_loss_term",
    "variable_path",
]
