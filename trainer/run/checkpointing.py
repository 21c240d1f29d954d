"""Checkpoints that hold everything a resume needs, matched to the model by its structure;
foreign model_dirs refused, NaNs never saved, `tapeloop.json` and the state file checked."""

from __future__ import annotations

import contextlib
import logging as python_logging
import os
import re
import shutil
import tempfile
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tensorflow as tf
from absl import logging

from trainer.errors import ConfigError
from trainer.options import TrainerOptions, recorded_options
from trainer.penalties.selection import variable_path
from trainer.run import files, records
from trainer.run.records import NUMBER, ListOf, MapOf, Optional, Record

METADATA = "tapeloop.json"
STATE_FILE = "checkpoint"  # the text proto `tf.train.get_checkpoint_state` reads

# State an option keeps only while it is on: a checkpoint may lack it, or hold it unused.
STATE_OPTIONS = {
    "ema_variables": "ema_decay",
    "swa_variables": "swa_every",
    "swa_models": "swa_every",
}
# Options that give the optimizer's state another form (mixed_float16 adds a loss scale's).
OPTIMIZER_OPTIONS = ("mixed_precision",)
# What every checkpoint of a run holds.
_REQUIRED = ("model_variables", "optimizer_variables", "step")
# Not the run's objects: the checkpoint's own counter, and where checkpoints older than the
# callbacks kept the watch's state (the controller restores it).
_NOT_OBJECTS = ("save_counter", "runs")


def _option_schema(hint: Any) -> Any:
    """The JSON schema of a `TrainerOptions` field's type; None where there is none here."""
    args = typing.get_args(hint)
    kinds = [k for k in args if k is not type(None)]
    if len(kinds) < len(args):  # `X | None`
        inner = _option_schema(kinds[0]) if len(kinds) == 1 else None
        return None if inner is None else Optional(inner)
    return {int: int, float: NUMBER, str: str, bool: bool}.get(hint)


def _settings_schema() -> Record:
    """`resume.settings`' record: the optimizer's class and learning rate (a number, or a
    schedule's config as a string), each recorded option by its type, each penalty's
    parameters (an object with its class), the parameter groups (their `repr`s)."""
    hints = typing.get_type_hints(TrainerOptions)
    options = {name: _option_schema(hints[name]) for name in recorded_options()}
    return Record(
        {
            "optimizer": str,
            "learning_rate": (int, float, str),
            "penalties": MapOf(Record({"class": str})),
            "param_groups": ListOf(str),
            **{name: schema for name, schema in options.items() if schema is not None},
        }
    )


_VARIABLE = Record(
    {"path": str, "shape": ListOf(Optional(int)), "dtype": str}, required=("path", "shape")
)
METADATA_SCHEMA = Record(
    {"task": str, "variables": ListOf(_VARIABLE), "settings": _settings_schema()},
    required=("task", "variables"),
)


def variable_table(variables: Sequence[Any]) -> list[dict[str, Any]]:
    """`[{"path", "shape", "dtype"}, ...]` in the model's order: the structure a checkpoint's
    `model_variables` list is restored by, and the paths, for messages."""
    return [
        {"path": variable_path(v), "shape": list(v.shape), "dtype": tf.as_dtype(v.dtype).name}
        for v in variables
    ]


def structure_differences(
    before: Sequence[Mapping[str, Any]], now: Sequence[Mapping[str, Any]]
) -> list[str]:
    """`path: before -> now` for each position where two variable tables differ in shape or
    dtype (a variable missing on one side is None; without a dtype, as in records written
    before dtypes were, by shape only). Paths are not compared: Keras names layers per
    process (`dense_3` for the same layer in a second model)."""
    lines = []
    for i in range(max(len(before), len(now))):
        old = before[i] if i < len(before) else None
        new = now[i] if i < len(now) else None
        other_dtype = bool(old and new and old.get("dtype", new["dtype"]) != new["dtype"])
        if old and new and old["shape"] == new["shape"] and not other_dtype:
            continue
        name = (new or old).get("path") or f"variable {i}"
        lines.append(f"{name}: {_entry(old, other_dtype)} -> {_entry(new, other_dtype)}")
    return lines


def _entry(entry: Mapping[str, Any] | None, dtype: bool) -> str:
    if entry is None:
        return "None"
    return f"{entry['shape']} {entry['dtype']}" if dtype else str(entry["shape"])


def _different(differences: list[str], before: int, now: int) -> str:
    """A different model in a few words: the counts when they differ, the first differences."""
    count = [f"{before} variables -> {now}"] if before != now else []
    more = ["..."] if len(differences) > 3 else []
    return "; ".join(count + differences[:3] + more)


class Checkpointer:
    """Saves and restores a training run in `directory` with `tf.train.CheckpointManager`.

    The checkpoint lists the model's variables explicitly (`tf.train.Checkpoint(model=...)`
    silently misses layers kept in Python lists and Keras seed-generator state), and holds the
    optimizer's variables, the step, each penalty's state keyed by the penalty's name (so
    that penalties may be added, removed or reordered between runs) and, when given, the
    input iterator. A `tapeloop.json` beside it records the task, the model's variable table
    and the run's settings: a `model_dir` written by another task or model is refused when
    the Checkpointer is made, and `saved_settings` lets a resumed run say what changed.

    A model is matched to a checkpoint by its structure (the order, shapes and dtypes of its
    variables), never by Keras' generated paths, which differ for the same model made twice
    in one process (`sequential_1/dense_3/...`). For the same reason per-weight state given
    keyed by weight path (the EMA's averages) is saved keyed by the weight's position.

    State that an option keeps only while it is on (`STATE_OPTIONS`: the EMA's averages) may
    be missing from a checkpoint made without it: per-weight state then starts from the
    restored weights, other state from its initial value; or held unused by a checkpoint
    made with it. Either is logged, naming the option. An optimizer state of another form
    (mixed_float16's loss scale added or removed, another momentum) is refused, naming
    the option where the run recorded it.

    Every file read is checked by structure (`records`): a damaged `tapeloop.json` or
    `checkpoint` state file is one line, and left for the user to fix or remove. A missing
    state file beside checkpoint files is rebuilt from the files (`check_state_file`).

    Args:
      directory: the run's `model_dir`.
      task: the task's name, recorded and checked.
      model_variables: all of the model's variables (trainable or not).
      objects: other trackables by name (optimizer variables, step) that every checkpoint
        of the run holds; more can be added with `track` before `restore`.
      penalty_states: each penalty's state variables by penalty name; restored for the
        names a checkpoint holds, the others keep their values.
      settings: what this run was configured with, recorded in `tapeloop.json` on save.
      chief: whether this process owns `directory`; other workers of a multi-worker run write
        to a temporary directory that is removed at `close()`, and restore from `directory`.
      max_to_keep: checkpoints kept.

    Raises:
      ConfigError: `directory` holds a run of another task or model; its `tapeloop.json` or
        `checkpoint` state file is damaged; it has checkpoints of which none is readable and
        no state file.
    """

    def __init__(
        self,
        directory: str,
        *,
        task: str,
        model_variables: Sequence[Any],
        objects: dict[str, Any],
        penalty_states: dict[str, Sequence[Any]] | None = None,
        settings: dict[str, Any] | None = None,
        chief: bool = True,
        max_to_keep: int = 3,
    ):
        self.directory = directory
        self.chief = chief
        self._metadata = {
            "task": task,
            "variables": variable_table(model_variables),
            "settings": settings or {},
        }
        self._model_variables = list(model_variables)
        self._positions = {variable_path(v): i for i, v in enumerate(self._model_variables)}
        self._per_weight: dict[str, dict[str, Any]] = {}
        self._core = {"model_variables": self._model_variables}
        for name, trackable in objects.items():
            self._core[name] = self._by_position(name, trackable)
        self._penalties = {name: list(v) for name, v in (penalty_states or {}).items() if v}
        self._checkpoint = tf.train.Checkpoint(**self._core, penalties=dict(self._penalties))
        self._tracked = {*self._core, "penalties"}
        self._saved_paths: list[str] = []
        self.saved_settings = self._check_metadata()
        check_state_file(directory, rebuild=chief)
        write_dir = directory if chief else tempfile.mkdtemp(prefix="tapeloop_worker_")
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, write_dir, max_to_keep=max_to_keep
        )
        self._reader = tf.train.CheckpointManager(self._checkpoint, directory, max_to_keep=None)

    def _by_position(self, name: str, trackable: Any) -> Any:
        """`trackable`, or, if it is per-weight state keyed by weight path, the same keyed by
        the weight's position in the model (remembered for `restore`)."""
        if not isinstance(trackable, Mapping) or not trackable:
            return trackable
        if not all(key in self._positions for key in trackable):
            return trackable
        self._per_weight[name] = dict(trackable)
        return {str(self._positions[path]): v for path, v in trackable.items()}

    def track(self, name: str, trackable: Any, restore: bool = True) -> None:
        """Adds `trackable` (e.g. the input iterator) to what is saved, and to what is
        restored unless `restore` is False (it then keeps its current state)."""
        if restore:
            self._core[name] = trackable
        self._tracked.add(name)
        setattr(self._checkpoint, name, trackable)

    @property
    def latest(self) -> str | None:
        """The checkpoint a restore without `resume_from` would use, if any."""
        return self._reader.latest_checkpoint

    def _check_metadata(self) -> dict[str, Any] | None:
        """The settings of the run recorded here (None without a record), after checking
        the record's structure and that it is this task's run of a model of this structure."""
        path = files.join(self.directory, METADATA)
        saved = files.read_json(path)
        if saved is None:
            return None
        if isinstance(saved, dict) and isinstance(saved.get("variables"), list):
            saved = {**saved, "variables": [_table_entry(e) for e in saved["variables"]]}
        records.check(saved, METADATA_SCHEMA, path)
        if saved["task"] != self._metadata["task"]:
            raise ConfigError(
                f"`model_dir` ({self.directory!r}) holds a run of task {saved['task']!r}, "
                f"not {self._metadata['task']!r}; use another --model_dir."
            )
        before, now = saved["variables"], self._metadata["variables"]
        differences = structure_differences(before, now)
        if differences:
            raise ConfigError(
                f"`model_dir` ({self.directory!r}) holds a different model "
                f"({_different(differences, len(before), len(now))}); use another --model_dir."
            )
        renamed = [(b["path"], n["path"]) for b, n in zip(before, now) if b["path"] != n["path"]]
        if renamed:
            logging.info(
                "This model's variables have other paths than the checkpointed run's (%s, "
                "there %s; %d in all): they are matched by order, shape and dtype.",
                renamed[0][1],
                renamed[0][0],
                len(renamed),
            )
        self._saved_paths = [entry["path"] for entry in before]
        return saved.get("settings")

    def restore(self, resume_from: str | None = None) -> bool:
        """Restores `resume_from`, else the latest checkpoint; False when there is none.

        Penalty state is restored for the penalties the checkpoint holds (by name); a penalty
        it does not hold keeps its initial state, which is logged. So does state of an
        option (`STATE_OPTIONS`) the checkpoint lacks, or holds and this run does not keep.

        Raises:
          ConfigError: `resume_from` does not exist; the checkpoint is unreadable (the
            message names the newest other checkpoint that is readable, if any), holds a
            model of another structure, an optimizer state of another form (naming the
            option that changed it), or does not match this run (what differs).
        """
        path = resume_from or self._reader.latest_checkpoint
        if resume_from and not tf.io.gfile.glob(resume_from + ".index"):
            raise ConfigError(
                f"`resume_from` ({resume_from!r}) is not a checkpoint; "
                f"checkpoints here: {', '.join(checkpoint_files(self.directory)) or 'none'}."
            )
        if path is None:
            return False
        if not readable_checkpoint(path):
            others = [p for p in reversed(checkpoint_files(self.directory)) if p != path]
            good = next((p for p in others if readable_checkpoint(p)), None)
            hint = f"; rerun with --resume_from={good}" if good else "; no other one is readable"
            raise ConfigError(f"Checkpoint {path!r} is unreadable (damaged files){hint}.")
        held = _held(path)
        self._check_structure(path, held)
        core, missing = {}, []
        for name, trackable in self._core.items():
            if name in held:
                core[name] = self._layout(name, trackable, held[name])
            elif _holds_state(trackable):
                missing.append(name)
        present = set(held.get("penalties", ()))
        try:
            restored = {n: v for n, v in self._penalties.items() if n in present}
            for root in (tf.train.Checkpoint(**core), tf.train.Checkpoint(penalties=restored)):
                status = root.restore(path)
                status.expect_partial()  # the other root's objects are in the file too
                status.assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            reason = str(e).strip().splitlines()[0][:200]
            if isinstance(e, tf.errors.DataLossError):
                raise ConfigError(f"Checkpoint {path!r} is unreadable ({reason}).") from None
            raise ConfigError(
                f"Checkpoint {path!r} does not match this run ({reason}); use another --model_dir."
            ) from None
        for name in missing:
            self._start_afresh(name, path)
        for name in sorted(set(held) - self._tracked - set(_NOT_OBJECTS)):
            logging.info(
                "Checkpoint %s holds %s, which this run does not keep%s: not restored.",
                path,
                name,
                self._option_change(name),
            )
        for name in sorted(set(self._penalties) - present):
            logging.info(
                "Penalty %s has no state in %s: it starts from its initial state.", name, path
            )
        logging.info("Restored %s", path)
        return True

    def _check_structure(self, path: str, held: dict[str, dict[str | None, Any]]) -> None:
        """Raises a ConfigError when the checkpoint at `path` is not a run's, holds a model of
        another structure, or an optimizer state of another form, naming what differs."""
        absent = [n for n in _REQUIRED if _holds_state(self._core.get(n)) and n not in held]
        if absent:
            raise ConfigError(
                f"Checkpoint {path!r} holds no {' or '.join(absent)}: it is not a tapeloop "
                "run's; use another --model_dir."
            )
        before = _listed(held.get("model_variables", {}))
        now = self._metadata["variables"]
        differences = structure_differences(before, now)
        if differences:
            raise ConfigError(
                f"Checkpoint {path!r} holds a different model "
                f"({_different(differences, len(before), len(now))}); use another --model_dir."
            )
        optimizer = self._core.get("optimizer_variables")
        if not isinstance(optimizer, list) or "optimizer_variables" not in held:
            return
        before = _listed(held["optimizer_variables"])
        now = variable_table(optimizer)
        if not structure_differences(before, now):
            return
        saved, settings = self.saved_settings or {}, self._metadata["settings"]
        changed = [k for k in OPTIMIZER_OPTIONS if k in saved and saved[k] != settings.get(k)]
        if changed:
            what = "; ".join(
                f"{k}: {saved[k]} in the checkpointed run, {settings.get(k)} now" for k in changed
            )
            raise ConfigError(
                f"Checkpoint {path!r} holds the optimizer's state in another form ({what}: "
                "mixed_float16 adds a loss scale to it); resume with the checkpointed run's "
                f"{' and '.join(changed)}, or use another --model_dir."
            )
        raise ConfigError(
            f"Checkpoint {path!r} holds the optimizer's state in another form (variables: "
            f"{len(before)} there, {len(now)} now: another momentum or mixed_precision, say); "
            "resume with the checkpointed run's optimizer settings, or use another --model_dir."
        )

    def _layout(self, name: str, trackable: Any, children: Mapping[str | None, Any]) -> Any:
        """`trackable` as the checkpoint lays it out: per-weight state of a checkpoint
        written before it was keyed by position is keyed by the writer's weight paths."""
        by_path = self._per_weight.get(name)
        if by_path is None or all(c is not None and c.isdigit() for c in children):
            return trackable
        count = len(self._model_variables)
        paths = self._saved_paths if len(self._saved_paths) == count else list(self._positions)
        return {paths[self._positions[path]]: v for path, v in by_path.items()}

    def _start_afresh(self, name: str, path: str) -> None:
        """State `name` the checkpoint at `path` lacks: per-weight state starts from the
        restored weights (the EMA of a run that turns it on now), other state keeps its
        initial value. Logged, with the option that keeps it."""
        by_path = self._per_weight.get(name)
        if by_path is not None:
            for weight_path, variable in by_path.items():
                weight = self._model_variables[self._positions[weight_path]]
                variable.assign(tf.cast(tf.convert_to_tensor(weight), variable.dtype))
        start = "the restored weights" if by_path else "its initial state"
        logging.info(
            "Checkpoint %s holds no %s%s: it starts from %s.",
            path,
            name,
            self._option_change(name),
            start,
        )

    def _option_change(self, name: str) -> str:
        """` (option: before in the checkpointed run -> now now)` for state `name` of an
        option; "" for other state."""
        option = STATE_OPTIONS.get(name)
        if option is None:
            return ""
        now = self._metadata["settings"].get(option)
        saved = self.saved_settings or {}
        if option not in saved:
            return f" ({option}: {now} now)"
        return f" ({option}: {saved[option]} in the checkpointed run -> {now} now)"

    def save(self, step: int) -> str:
        """Saves a checkpoint for `step`, after checking that every model variable is finite.

        Raises:
          FloatingPointError: a model variable is not finite (nothing is written).
        """
        for v in self._model_variables:
            if "float" in str(v.dtype) and not bool(tf.reduce_all(tf.math.is_finite(v))):
                raise FloatingPointError(
                    f"Non-finite weights at step {step} in {variable_path(v)!r}; "
                    "not saving a checkpoint."
                )
        path = self._manager.save(checkpoint_number=step)
        if self.chief:
            files.write_json(files.join(self.directory, METADATA), self._metadata)
        return path

    def remove_temporary(self) -> list[str]:
        """Removes `ckpt-*_temp` folders a killed save left behind; returns their paths."""
        stale = [
            p
            for p in tf.io.gfile.glob(files.join(self.directory, "ckpt-*_temp*"))
            if tf.io.gfile.isdir(p)
        ]
        for path in stale:
            tf.io.gfile.rmtree(path)
            logging.info("Removed %s, left by an interrupted save.", path)
        return stale

    def close(self) -> None:
        """Removes a non-chief worker's temporary checkpoints."""
        if not self.chief:
            shutil.rmtree(self._manager.directory, ignore_errors=True)


def _table_entry(entry: Any) -> Any:
    """A variable table's entry as written now: `[path, shape]` (records written before
    dtypes were) becomes `{"path", "shape"}`; anything else is left to the schema."""
    if isinstance(entry, list) and len(entry) == 2:
        return {"path": entry[0], "shape": entry[1]}
    return entry


def _holds_state(trackable: Any) -> bool:
    """Whether `trackable` has something to restore (an empty list or dict saves nothing)."""
    if isinstance(trackable, (list, tuple, Mapping)):
        return bool(trackable)
    return trackable is not None


def _held(path: str) -> dict[str, dict[str | None, dict[str, Any]]]:
    """The checkpoint's top-level objects: for each, its children by key (None for a value
    of its own) with the shape and dtype of a variable under each."""
    reader = _reader(path)
    dtypes = reader.get_variable_to_dtype_map()
    held: dict[str, dict[str | None, dict[str, Any]]] = {}
    for key, shape in reader.get_variable_to_shape_map().items():
        parts = key.split("/")
        if len(parts) < 2:  # the object graph itself
            continue
        child = None if parts[1] == ".ATTRIBUTES" else parts[1]
        held.setdefault(parts[0], {})[child] = {"shape": list(shape), "dtype": dtypes[key].name}
    return held


def _listed(children: Mapping[str | None, dict[str, Any]]) -> list[dict[str, Any]]:
    """A list's entries (children keyed `0`, `1`, ...) in order."""
    numbered = {int(k): v for k, v in children.items() if k is not None and k.isdigit()}
    return [numbered[i] for i in sorted(numbered)]


def checkpoint_files(directory: str) -> list[str]:
    """The checkpoint prefixes (`ckpt-N`) in `directory`, oldest step first."""
    found = []
    for index in tf.io.gfile.glob(files.join(directory, "ckpt-*.index")):
        match = re.search(r"ckpt-(\d+)\.index$", index)
        if match:
            found.append((int(match.group(1)), index[: -len(".index")]))
    return [path for _, path in sorted(found)]


def check_state_file(directory: str, *, rebuild: bool = True) -> None:
    """Checks `directory`'s `checkpoint` state file against the checkpoint files there.

    A missing one beside checkpoint files was lost (a crash between writes, a copy that left
    it out): with `rebuild`, it is rebuilt from the files, the newest readable checkpoint as
    the latest, and logged. A damaged one (garbled, empty, naming a checkpoint that does not
    exist or is outside `directory`) is left as it is for the user to fix or remove:
    TensorFlow would ignore it, and the next save would write over it.

    Raises:
      ConfigError: the state file is damaged (the message says which checkpoint a rebuilt
        one would name); or it is missing and none of the checkpoint files is readable.
    """
    found = checkpoint_files(directory)
    state_path = files.join(directory, STATE_FILE)
    if tf.io.gfile.exists(state_path):
        problem = _state_problem(directory, state_path)
        if problem:
            raise ConfigError(
                f"{state_path!r} is damaged: {problem}; it is left as it is: fix it, or remove "
                f"it to have it rebuilt from the checkpoint files ({_rebuilt_from(found)})."
            )
        return
    if not found or not rebuild:
        return
    readable = [p for p in reversed(found) if readable_checkpoint(p)]
    names = ", ".join(os.path.basename(p) for p in found)
    if not readable:
        raise ConfigError(
            f"`model_dir` ({directory!r}) has no 'checkpoint' state file and none of its "
            f"checkpoints ({names}) is readable; use another --model_dir."
        )
    latest = readable[0]
    kept = found[: found.index(latest) + 1]
    tf.compat.v1.train.update_checkpoint_state(  # relative paths, as CheckpointManager writes
        directory,
        os.path.basename(latest),
        all_model_checkpoint_paths=[os.path.basename(p) for p in kept],
    )
    logging.warning(
        "The 'checkpoint' state file in %s was missing; rebuilt it from the files (%s): "
        "the latest is %s, the newest readable.",
        directory,
        names,
        latest,
    )


def _state_problem(directory: str, state_path: str) -> str | None:
    """What is wrong with the state file at `state_path`, or None."""
    with tf.io.gfile.GFile(state_path) as f:
        if not f.read().strip():
            return "it is empty"
    try:
        with _quiet_tensorflow():  # it logs a parse error, then returns None
            state = tf.train.get_checkpoint_state(directory)
    except ValueError:
        return "it names no checkpoint (no model_checkpoint_path)"
    if state is None:
        return "it is not a checkpoint state (a text proto with model_checkpoint_path)"
    for path in (state.model_checkpoint_path, *state.all_model_checkpoint_paths):
        if not _inside(directory, path):
            return f"it names {path!r}, outside the directory"
        if not tf.io.gfile.exists(path + ".index"):
            return f"it names {path!r}, which does not exist"
    return None


def _rebuilt_from(found: Sequence[str]) -> str:
    """Which checkpoint a rebuilt state file would name, in a few words."""
    if not found:
        return "there are none: the run would start from step 0"
    latest = next((p for p in reversed(found) if readable_checkpoint(p)), None)
    if latest is None:
        return "none of them is readable"
    return f"it would name {latest}, the newest readable"


def _inside(directory: str, path: str) -> bool:
    """Whether checkpoint `path` lies directly in `directory` (local paths or URLs)."""
    if "://" in directory or "://" in path:
        return path.rsplit("/", 1)[0].rstrip("/") == directory.rstrip("/")
    return os.path.dirname(os.path.abspath(path)) == os.path.abspath(directory)


@contextlib.contextmanager
def _quiet_tensorflow() -> Iterator[None]:
    """Within it, TensorFlow's Python logger shows errors only."""
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel(python_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _reader(path: str) -> Any:
    """A reader of the checkpoint at `path`. Not `tf.train.load_checkpoint`, which takes
    `ram://.../ckpt-N` for a directory."""
    return tf.compat.v1.train.NewCheckpointReader(path)


def readable_checkpoint(path: str) -> bool:
    """Whether every tensor of the checkpoint at `path` can be read (its files are intact)."""
    try:
        reader = _reader(path)
        for key, dtype in reader.get_variable_to_dtype_map().items():
            if dtype != tf.variant:  # an iterator's state: not readable outside its dataset
                reader.get_tensor(key)
    except Exception:  # damaged files fail in many ways
        return False
    return True
