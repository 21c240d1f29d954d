"""Name -> class registries for tasks, penalties and parameter groups, spec parsing, plugin
discovery."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from trainer.errors import ConfigError

TASK_ENTRY_POINTS = "trainer.tasks"
PENALTY_ENTRY_POINTS = "trainer.penalties"

# Specs come from the command line: bounded before `ast` sees them, whose parser and
# `literal_eval` recurse (a 100 kB `l2(1+1+...)` raised RecursionError, `l2(---...1)`
# MemoryError). The length bounds the size; the depth, the recursion.
MAX_SPEC_LENGTH = 1000
MAX_SPEC_DEPTH = 20

_TASKS: dict[str, type] = {}
_PENALTIES: dict[str, type] = {}
_PARAM_GROUPS: dict[str, type] = {}


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[type], type]:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"A {kind} name must be a Python identifier, got {name!r}.")

    def decorator(cls: type) -> type:
        existing = table.get(name)
        if existing is not None and (existing.__module__, existing.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise ConfigError(
                f"{kind} name {name!r} is already registered to "
                f"{existing.__module__}.{existing.__qualname__}; register "
                f"{cls.__module__}.{cls.__qualname__} under another name."
            )
        table[name] = cls
        cls.registered_name = name
        return cls

    return decorator


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator: registers a `Trainer` subclass as the task `name`.

    Args:
      name: the name used by `--task=NAME`; a Python identifier.

    Returns:
      A decorator that returns the class unchanged.
    """
    return _register(_TASKS, "task", name)


def register_penalty(name: str) -> Callable[[type], type]:
    """Class decorator: registers a `Penalty` subclass under `name` for `--penalty` specs.

    Args:
      name: the call name used in specs, e.g. `"l1"` for `--penalty="l1(1e-5)"`.

    Returns:
      A decorator that returns the class unchanged.
    """
    return _register(_PENALTIES, "penalty", name)


def register_param_group(name: str) -> Callable[[type], type]:
    """Class decorator: registers a `ParamGroup` subclass under `name` for `--param_group` specs.

    Args:
      name: the call name used in specs, e.g. `"freeze"` for
        `--param_group="freeze(include='emb')"`.

    Returns:
      A decorator that returns the class unchanged.
    """
    return _register(_PARAM_GROUPS, "param_group", name)


def load_plugins(group: str) -> None:
    """Imports every entry point of `group`; importing registers what it defines.

    An entry point may name a module (imported for its decorators) or a class, which is
    registered under the entry point's name if its module did not register it.
    """
    table = _TASKS if group == TASK_ENTRY_POINTS else _PENALTIES
    for entry_point in importlib.metadata.entry_points(group=group):
        loaded = entry_point.load()
        if inspect.isclass(loaded) and loaded not in table.values():
            table[entry_point.name] = loaded
            loaded.registered_name = entry_point.name


def import_modules(names: Iterable[str]) -> None:
    """Imports user modules (`--import=my_module`) so their decorators register them.

    Raises:
      ConfigError: a module cannot be found.
    """
    for name in names:
        if not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(f"--import={name!r} is not a module name like 'my_package.tasks'.")
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                raise ConfigError(f"--import={name!r}: no such module on sys.path.") from e
            raise ConfigError(
                f"--import={name!r}: the module imports {e.name!r}, which is not installed."
            ) from e


def task_names() -> list[str]:
    """The registered task names, sorted."""
    return sorted(_TASKS)


def penalty_names() -> list[str]:
    """The registered penalty names, sorted."""
    return sorted(_PENALTIES)


def get_task(name: str) -> type:
    """Returns the task class registered as `name`.

    Raises:
      ConfigError: no task has that name; the message lists the registered ones.
    """
    if name not in _TASKS:
        raise ConfigError(f"Unknown task {name!r}; registered tasks: {', '.join(task_names())}.")
    return _TASKS[name]


def get_penalty(name: str) -> type:
    """Returns the penalty class registered as `name`.

    Raises:
      ConfigError: no penalty has that name; the message lists the registered ones.
    """
    if name not in _PENALTIES:
        raise ConfigError(
            f"Unknown penalty {name!r}; registered penalties: {', '.join(penalty_names())}."
        )
    return _PENALTIES[name]


def param_group_names() -> list[str]:
    """The registered parameter group names, sorted."""
    return sorted(_PARAM_GROUPS)


def get_param_group(name: str) -> type:
    """Returns the parameter group class registered as `name`.

    Raises:
      ConfigError: no parameter group has that name; the message lists the registered ones.
    """
    if name not in _PARAM_GROUPS:
        raise ConfigError(
            f"Unknown parameter group {name!r}; registered parameter groups: "
            f"{', '.join(param_group_names())}."
        )
    return _PARAM_GROUPS[name]


def _abbreviate(spec: str, width: int = 60) -> str:
    """`repr(spec)`, cut to about `width` characters with `...` where it is longer."""
    return repr(spec if len(spec) <= width else spec[: width - 3] + "...")


def _depth_exceeds(node: ast.AST, limit: int) -> bool:
    """Whether the tree under `node` is more than `limit` levels deep (without recursing)."""
    stack = [(node, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return False


def _parse(spec: str, kind: str = "Penalty") -> ast.expr:
    """The expression of `spec`, within `MAX_SPEC_LENGTH` and `MAX_SPEC_DEPTH`.

    Raises:
      ConfigError: the spec is too long, too deeply nested, or not an expression.
    """
    if len(spec) > MAX_SPEC_LENGTH:
        raise ConfigError(
            f"{kind} spec {_abbreviate(spec)} is {len(spec)} characters long; "
            f"the limit is {MAX_SPEC_LENGTH} characters."
        )
    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError as e:
        raise ConfigError(
            f"Malformed {kind.lower()} spec {spec!r}: expected a call like {_EXAMPLES[kind]} "
            f"({e.msg})."
        ) from e
    except (RecursionError, MemoryError) as e:  # not seen within the length limit
        raise ConfigError(
            f"{kind} spec {_abbreviate(spec)} is too complex to parse "
            f"({type(e).__name__}); a spec is a call with literal arguments."
        ) from e
    if _depth_exceeds(node, MAX_SPEC_DEPTH):
        raise ConfigError(
            f"{kind} spec {_abbreviate(spec)} nests deeper than the limit of "
            f"{MAX_SPEC_DEPTH} levels."
        )
    return node


def _literal(spec: str, node: ast.AST, kind: str = "Penalty") -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, MemoryError, RecursionError) as e:
        raise ConfigError(
            f"{kind} spec {spec!r}: argument {ast.unparse(node)!r} is not a literal "
            "(numbers, strings, booleans, None, lists and tuples only)."
        ) from e


def constructor_signature(cls: type) -> inspect.Signature:
    """`cls(...)`'s signature, without annotations, with a pass-through `**kwargs` (e.g. a
    penalty's `**selection`) replaced by the keyword-only parameters of the base-class
    constructors it reaches (`include`, `exclude`, `name`)."""
    keyword, var = inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD
    parameters: dict[str, inspect.Parameter] = {}
    passes_on = True
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        own = list(inspect.signature(init).parameters.values())[1:]  # without self
        first = not parameters
        for p in own:
            if p.kind != var and (first or p.kind == keyword):
                parameters.setdefault(p.name, p.replace(annotation=inspect.Parameter.empty))
        passes_on = any(p.kind == var for p in own)
        if not passes_on:
            break
    if passes_on:
        parameters["kwargs"] = inspect.Parameter("kwargs", var)
    ordered = sorted(parameters.values(), key=lambda p: p.kind)  # a stable sort: kinds in order
    return inspect.Signature(ordered)


def parse_penalty_spec(spec: str) -> Any:
    """Builds a penalty from a spec in Python-call syntax, without `eval`.

    `"selective_l2(1e-4, exclude='bias')"` calls the class registered as `selective_l2`
    with those literal arguments; a bare name (`"l2"`) calls it with none.

    Args:
      spec: the spec string.

    Returns:
      The constructed `Penalty`.

    Raises:
      ConfigError: the spec is malformed, longer than `MAX_SPEC_LENGTH` characters or
        nested more than `MAX_SPEC_DEPTH` levels deep, names an unknown penalty, passes an
        argument the class does not take, or a value the class rejects.
    """
    return _build_from_spec(spec, "Penalty", get_penalty)


def parse_param_group_spec(spec: str) -> Any:
    """Builds a parameter group from a spec in Python-call syntax, as `parse_penalty_spec`.

    `"lr_multiplier(0.1, include='dense/')"` calls the class registered as `lr_multiplier`.

    Raises:
      ConfigError: as `parse_penalty_spec`, for parameter groups.
    """
    return _build_from_spec(spec, "Parameter group", get_param_group)


# A spec of each kind, for the message of a malformed one.
_EXAMPLES = {"Penalty": '"l2(1e-4)"', "Parameter group": "\"freeze(include='embedding')\""}


def _build_from_spec(spec: str, kind: str, lookup: Callable[[str], type]) -> Any:
    node = _parse(spec, kind)
    if isinstance(node, ast.Name):
        node = ast.Call(func=node, args=[], keywords=[])
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ConfigError(
            f"Malformed {kind.lower()} spec {spec!r}: expected a call like {_EXAMPLES[kind]}."
        )
    cls = lookup(node.func.id)
    if any(kw.arg is None for kw in node.keywords) or any(
        isinstance(arg, ast.Starred) for arg in node.args
    ):
        raise ConfigError(f"{kind} spec {spec!r}: * and ** arguments are not allowed.")
    args = [_literal(spec, arg, kind) for arg in node.args]
    kwargs = {kw.arg: _literal(spec, kw.value, kind) for kw in node.keywords}
    signature = constructor_signature(cls)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(
            f"{kind} spec {spec!r}: {e}; {node.func.id} takes {node.func.id}{signature}."
        ) from e
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{kind} spec {spec!r}: {e}") from e
