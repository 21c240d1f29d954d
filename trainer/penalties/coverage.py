"""The coverage table: which penalties and decays cover each trainable variable, and which none."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from trainer import optimizers
from trainer.errors import ConfigError
from trainer.penalties.selection import variable_path


@dataclasses.dataclass(frozen=True)
class Coverage:
    """One row group of the table: something that acts on a set of variables.

    Attributes:
      name: the short name in the `penalties` column (a penalty's `name`).
      description: the long form listed under the table (a penalty's `repr`, marked if it
        projects after the update).
      variables: the variables it acts on.
      decays: whether it decays its variables directly (a penalty with `decays`, such as
        decoupled weight decay, or the optimizer's own `weight_decay`); two decays on one
        variable are an error. Other direct updates (a max-norm projection) are not decays.
    """

    name: str
    description: str
    variables: Sequence[Any]
    decays: bool = False


def optimizer_decay(optimizer: Any, variables: Sequence[Any]) -> Coverage | None:
    """The optimizer's own weight decay as a `Coverage`, or None when it has none.

    Keras optimizers all take `weight_decay` (`AdamW` defaults to 0.004, on every variable):
    the variables it decays are those `exclude_from_weight_decay` did not exclude.
    """
    inner = optimizers.inner(optimizer)
    rate = getattr(inner, "weight_decay", None)
    if not rate:
        return None
    # Keras' own test of its exclusion lists (ids and name patterns), so the table shows
    # exactly the variables `apply_gradients` decays.
    decayed = [v for v in variables if inner._use_weight_decay(v)]
    if not decayed:
        return None
    return Coverage(
        name="optimizer_weight_decay",
        description=f"{type(inner).__name__}(weight_decay={rate:g}), the optimizer's own",
        variables=decayed,
        decays=True,
    )


def keras_constraints(variables: Sequence[Any]) -> list[Coverage]:
    """The Keras layer constraints (`kernel_constraint=...`) on `variables`, one entry per
    distinct constraint (type and config).

    Keras' optimizer applies `variable.constraint` itself, right after its update inside
    `apply_gradients` (skipped with the step under a `LossScaleOptimizer`): the step applies
    them as `model.fit` does, and the table shows them.
    """
    groups: dict[str, list[Any]] = {}
    for v in variables:
        constraint = getattr(v, "constraint", None)
        if constraint is not None:
            groups.setdefault(_describe_constraint(constraint), []).append(v)
    return [
        Coverage("keras_constraint", f"{description}, a Keras constraint after the update", vs)
        for description, vs in groups.items()
    ]


def _describe_constraint(constraint: Any) -> str:
    """`MaxNorm(max_value=2, axis=0)`: the class and its Keras config."""
    get_config = getattr(constraint, "get_config", None)
    config = get_config() if callable(get_config) else {}
    name = getattr(constraint, "__name__", None) or type(constraint).__name__  # a bare function
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in (config or {}).items())})"


def check_single_decay(coverages: Sequence[Coverage]) -> None:
    """Raises if a variable is decayed directly by two mechanisms.

    Raises:
      ConfigError: naming the variable and both mechanisms.
    """
    first: dict[int, Coverage] = {}
    for coverage in coverages:
        if not coverage.decays:
            continue
        for v in coverage.variables:
            other = first.setdefault(id(v), coverage)
            if other is not coverage:
                raise ConfigError(
                    f"{variable_path(v)!r} would be decayed twice, by {other.description} and "
                    f"by {coverage.description}; keep one (e.g. --optimizer=adam with "
                    "decoupled_weight_decay, or exclude the variable from one of them)."
                )


def coverage(
    selections: Sequence[tuple[Any, Sequence[Any]]], optimizer: Any, variables: Sequence[Any]
) -> list[Coverage]:
    """What acts on `variables`: each penalty's selection, the optimizer's own decay, then
    the Keras layer constraints.

    Args:
      selections: `(penalty, selected variables)` pairs.
      optimizer: the optimizer, whose `weight_decay` counts as a decay.
      variables: the trainable variables.

    Raises:
      ConfigError: a variable is decayed by two mechanisms (see `check_single_decay`).
    """
    entries = [Coverage(p.name, _describe(p), v, decays=p.decays) for p, v in selections]
    decay = optimizer_decay(optimizer, variables)
    entries += [decay] if decay else []
    entries += keras_constraints(variables)
    check_single_decay(entries)
    return entries


def _describe(penalty: Any) -> str:
    """A penalty's `repr`, with when it acts if after the optimizer's update."""
    return repr(penalty) + (", a projection after the update" if penalty.has_project else "")


def coverage_table(variables: Sequence[Any], coverages: Sequence[Coverage]) -> str:
    """A text table: each variable's path, shape, parameter count and what covers it.

    Variables nothing covers are marked `-- none --`, so that biases, normalization
    parameters and embeddings left out (or wrongly included) stand out. Totals per entry
    and for the uncovered variables follow, then each entry's description.
    """
    covering = {id(v): [] for v in variables}
    for coverage in coverages:
        for v in coverage.variables:
            covering[id(v)].append(coverage.name)
    rows = [("variable", "shape", "params", "penalties")]
    for v in variables:
        names = covering[id(v)]
        rows.append(
            (
                variable_path(v),
                str(tuple(v.shape)),
                f"{math.prod(v.shape):,}",
                ", ".join(names) if names else "-- none --",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]

    def line(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    lines = [line(r) for r in rows]
    total = sum(math.prod(v.shape) for v in variables)
    lines.append(f"{len(variables)} trainable variables, {total:,} parameters")
    for coverage in coverages:
        count = sum(math.prod(v.shape) for v in coverage.variables)
        lines.append(
            f"  {coverage.name}: {len(coverage.variables)} variables, {count:,} parameters  "
            f"{coverage.description}"
        )
    uncovered = [v for v in variables if not covering[id(v)]]
    count = sum(math.prod(v.shape) for v in uncovered)
    lines.append(f"  covered by no penalty: {len(uncovered)} variables, {count:,} parameters")
    return "\n".join(lines)
