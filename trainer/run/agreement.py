"""Every worker of a multi-worker run starts from the chief's state: its step and weights."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import tensorflow as tf
from absl import logging

from trainer.distribution import (
    broadcast_from_chief,
    gather_from_workers,
    worker_count,
    worker_index,
    worker_names,
)
from trainer.errors import ConfigError


def start_from_chief(strategy: tf.distribute.Strategy, state: Mapping[str, Any], step: int) -> int:
    """Gives every variable of `state`, on every worker, the chief's value.

    Each worker restores what its own `model_dir` holds, but only the chief's holds the run's
    checkpoints (a non-chief saves to a temporary directory that it removes): with a
    `model_dir` per host, a resumed non-chief would otherwise start from step 0 with fresh
    weights while the chief continues, and all-reduce gradients of different weights. Here
    the workers first compare their state's layout (the number, shapes and dtypes of its
    variables); where it agrees, the chief's values (model, optimizer, step, penalty and
    callback state) are broadcast, and a non-chief logs the step it took. With one process
    nothing runs.

    Args:
      strategy: the run's strategy.
      state: what a checkpoint of the run holds, by name: variables in nested dicts and
        lists, as the chief's checkpoint has them.
      step: this worker's step, as it restored it (or 0).

    Returns:
      The step every worker starts from: the chief's.

    Raises:
      ConfigError: the workers' states differ in layout (the message names the workers,
        with their steps); raised on every worker, before any step.
    """
    if worker_count(strategy) == 1:
        return step
    variables = _unique_variables(state)
    rows = gather_from_workers(strategy, [step, *_layout(variables)])
    problem = disagreement(worker_names(strategy), rows)
    if problem:
        raise ConfigError(problem)
    values = broadcast_from_chief(strategy, [tf.convert_to_tensor(v) for v in variables])
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)
    chief_step = rows[0][0]
    if worker_index(strategy) != 0:
        logging.info("Took the chief's state: step %d (this worker had step %d).", chief_step, step)
    return chief_step


def disagreement(names: list[str], rows: list[list[int]]) -> str | None:
    """Why the workers cannot take the chief's state, or None if they can.

    Args:
      names: the workers, chief first (`distribution.worker_names`).
      rows: each worker's `[step, variables, values, layout checksum]`, in that order.
    """
    chief = rows[0]
    differ = [i for i, row in enumerate(rows) if row[1:] != chief[1:]]
    if not differ:
        return None

    def held(i: int) -> str:
        step, count, size = rows[i][:3]
        other = " of other shapes or dtypes" if i and (count, size) == tuple(chief[1:3]) else ""
        return f"{names[i]} at step {step}: {count} variables, {size} values{other}"

    return (
        "The workers' checkpointed state differs, so they cannot start from the chief's: "
        + "; ".join(held(i) for i in [0, *differ])
        + " (the first is the chief). Run the same task, model and options on every worker."
    )


def _unique_variables(state: Mapping[str, Any]) -> list[Any]:
    """The variables of `state` (leaves with `assign`), each once, in a fixed order."""
    seen: set[int] = set()
    variables = []
    for leaf in tf.nest.flatten(state):
        if hasattr(leaf, "assign") and id(leaf) not in seen:
            seen.add(id(leaf))
            variables.append(leaf)
    return variables


def _layout(variables: list[Any]) -> list[int]:
    """`[variables, values, checksum of their shapes and dtypes]`."""
    described = ";".join(f"{list(v.shape)} {tf.as_dtype(v.dtype).name}" for v in variables)
    size = sum(int(tf.TensorShape(v.shape).num_elements()) for v in variables)
    return [len(variables), size, zlib.crc32(described.encode())]
