"""Choosing variables by name: a regex searched in `variable.path`, or a predicate."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from trainer.errors import ConfigError

Selector = str | Callable[[Any], bool] | None


def variable_path(variable: Any) -> str:
    """The name selection matches on: Keras 3 `variable.path`, else the TF name sans `:0`."""
    path = getattr(variable, "path", None)
    if path:
        return path
    return variable.name.removesuffix(":0")


def compile_selector(argument: str, selector: Selector) -> re.Pattern | Callable | None:
    """`selector` as a compiled regex, or the predicate (or None) unchanged.

    Raises:
      ConfigError: `selector` is neither a string, a callable nor None, or an invalid regex.
    """
    if selector is None or callable(selector):
        return selector
    if not isinstance(selector, str):
        raise ConfigError(
            f"`{argument}` ({selector!r}) must be a regex string, a predicate or None."
        )
    try:
        return re.compile(selector)
    except re.error as e:
        raise ConfigError(f"`{argument}` ({selector!r}) is not a valid regex: {e}.") from e


def matches(selector: re.Pattern | Callable, variable: Any) -> bool:
    """Whether the regex is found in the variable's path, or the predicate accepts it."""
    if isinstance(selector, re.Pattern):
        return selector.search(variable_path(variable)) is not None
    return bool(selector(variable))


def select(
    variables: Sequence[Any],
    *,
    include: re.Pattern | Callable | None,
    exclude: re.Pattern | Callable | None,
    default: Callable[[Any], bool],
    owner: str,
) -> list[Any]:
    """The variables `include` matches (`default` accepts, without it) and `exclude` does not.

    Args:
      variables: the candidates, e.g. a model's trainable variables.
      include: a compiled regex or predicate; None to use `default`.
      exclude: a compiled regex or predicate; None to exclude nothing.
      default: the selection without `include`.
      owner: who selects, for error messages (e.g. a penalty's `repr`).

    Returns:
      The selected variables, in their original order.

    Raises:
      ConfigError: a regex matches no variable path at all, or nothing is selected: a typo
        must not turn a selection into a silent no-op. The message lists some real paths.
    """
    variables = list(variables)
    paths = [variable_path(v) for v in variables]
    examples = ", ".join(repr(p) for p in paths[:4]) + (", ..." if len(paths) > 4 else "")
    for argument, selector in (("include", include), ("exclude", exclude)):
        if isinstance(selector, re.Pattern) and not any(selector.search(p) for p in paths):
            raise ConfigError(
                f"{owner}: {argument}={selector.pattern!r} matches no variable path of "
                f"the {len(paths)} trainable variables ({examples})."
            )
    chosen = [
        v
        for v in variables
        if (matches(include, v) if include else default(v))
        and not (exclude and matches(exclude, v))
    ]
    if not chosen:
        raise ConfigError(
            f"{owner} selects no variable among the {len(paths)} trainable variables ({examples})."
        )
    return chosen
