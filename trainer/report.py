"""The coverage table: which penalties cover each trainable variable, and which none cover."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from trainer.penalties import Penalty, variable_path


def coverage_table(
    variables: Sequence[Any], selections: Sequence[tuple[Penalty, Sequence[Any]]]
) -> str:
    """A text table: each variable's path, shape, parameter count and covering penalties.

    Variables no penalty covers are marked `-- none --`, so that biases, normalization
    parameters and embeddings left out (or wrongly included) stand out. Totals per penalty
    and for the uncovered variables follow, then each penalty's `repr`.
    """
    covering = {id(v): [] for v in variables}
    for penalty, selected in selections:
        for v in selected:
            covering[id(v)].append(penalty.name)
    rows = [("variable", "shape", "params", "penalties")]
    for v in variables:
        names = covering[id(v)]
        rows.append((variable_path(v), str(tuple(v.shape)), f"{math.prod(v.shape):,}",
                     ", ".join(names) if names else "-- none --"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]

    def line(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    lines = [line(r) for r in rows]
    total = sum(math.prod(v.shape) for v in variables)
    lines.append(f"{len(variables)} trainable variables, {total:,} parameters")
    for penalty, selected in selections:
        count = sum(math.prod(v.shape) for v in selected)
        lines.append(
            f"  {penalty.name}: {len(selected)} variables, {count:,} parameters  {penalty!r}"
        )
    uncovered = [v for v in variables if not covering[id(v)]]
    count = sum(math.prod(v.shape) for v in uncovered)
    lines.append(f"  covered by no penalty: {len(uncovered)} variables, {count:,} parameters")
    return "\n".join(lines)
