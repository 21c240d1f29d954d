"""The JSON files a run reads back, checked by structure, not only by syntax.

A file of the right JSON type at the top can still hold a string where a number belongs;
reading it would fail later with a traceback far from the cause. `read` checks the whole
value against a schema and names the file and the field of the first mismatch, in one line
(`ConfigError`: exit status 2 from the CLI). Nothing is written over a file that fails: the
user decides (fix it, or remove it).

A schema is one of:
  - a type or a tuple of types (`int` never accepts a bool; `float` accepts an int),
  - `Optional(schema)`: None (JSON null) or the schema,
  - `ListOf(schema)`: a list whose items match,
  - `MapOf(schema)`: an object whose values match (any keys),
  - `Record({key: schema}, required=(...), rest=schema)`: an object whose listed keys match
    when present (those in `required` must be), other keys matching `rest` when given.

Unknown keys are accepted (`rest=None`) so that files written by newer versions still read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from trainer.errors import ConfigError
from trainer.run import files


@dataclasses.dataclass(frozen=True)
class Optional:
    """None, or a value matching `schema`."""

    schema: Any


@dataclasses.dataclass(frozen=True)
class ListOf:
    """A list whose items all match `schema`."""

    schema: Any


@dataclasses.dataclass(frozen=True)
class MapOf:
    """An object whose values all match `schema`."""

    schema: Any


@dataclasses.dataclass(frozen=True)
class Record:
    """An object with the listed keys matching their schemas (`required` ones present), and
    any other key matching `rest` (any value when `rest` is None)."""

    fields: Mapping[str, Any]
    required: tuple[str, ...] = ()
    rest: Any = None


NUMBER = (int, float)
METRICS = MapOf(Optional(NUMBER))  # non-finite values are written as null


class _Mismatch(Exception):
    def __init__(self, field: str, expected: str, value: Any):
        self.field, self.expected, self.value = field, expected, value


def _name(schema: Any) -> str:
    if isinstance(schema, Optional):
        return f"{_name(schema.schema)} or null"
    if isinstance(schema, ListOf):
        return "a list"
    if isinstance(schema, (MapOf, Record)):
        return "an object"
    kinds = schema if isinstance(schema, tuple) else (schema,)
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if set(kinds) == {int, float}:
        return "a number"
    return " or ".join(words.get(k, k.__name__) for k in kinds)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _check(value: Any, schema: Any, field: str) -> None:
    if isinstance(schema, Optional):
        if value is not None:
            try:
                _check(value, schema.schema, field)
            except _Mismatch as e:
                if e.field == field:  # the value itself, not a field inside it
                    e.expected = _name(schema)
                raise
        return
    if isinstance(schema, ListOf):
        if not isinstance(value, list):
            raise _Mismatch(field, _name(schema), value)
        for i, item in enumerate(value):
            _check(item, schema.schema, f"{field}[{i}]")
        return
    if isinstance(schema, (MapOf, Record)):
        if not isinstance(value, dict):
            raise _Mismatch(field, _name(schema), value)
        prefix = f"{field}." if field else ""
        if isinstance(schema, MapOf):
            for key, item in value.items():
                _check(item, schema.schema, prefix + key)
            return
        for key in schema.required:
            if key not in value:
                raise _Mismatch(prefix + key, f"present ({_name(schema.fields[key])})", None)
        for key, item in value.items():
            if key in schema.fields:
                _check(item, schema.fields[key], prefix + key)
            elif schema.rest is not None:
                _check(item, schema.rest, prefix + key)
        return
    kinds = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(value, bool):
        ok = bool in kinds
    else:
        ok = isinstance(value, kinds) or (isinstance(value, int) and float in kinds)
    if not ok:
        raise _Mismatch(field, _name(schema), value)


def check(value: Any, schema: Any, path: str) -> Any:
    """Returns `value` if it matches `schema`.

    Raises:
      ConfigError: one line naming `path`, the first field that does not match, what it
        should be and what it is.
    """
    try:
        _check(value, schema, "")
    except _Mismatch as e:
        where = f"field `{e.field}`" if e.field else "its top level"
        if e.expected.startswith("present"):
            what = f"is missing (it should be {e.expected[len('present (') : -1]})"
        else:
            shown = repr(e.value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            what = f"should be {e.expected}, not {_type_name(e.value)} ({shown})"
        raise ConfigError(
            f"{path!r} is damaged: {where} {what}; it is left as it is: fix it, or remove it."
        ) from None
    return value


def read(path: str, schema: Any) -> Any | None:
    """The JSON value in `path` checked against `schema`, or None when there is no such file.

    Raises:
      ConfigError: the file is not valid JSON, or does not match `schema` (the message
        names the field).
    """
    value = files.read_json(path)
    return None if value is None else check(value, schema, path)
