"""Checkpoints that hold everything a resume needs, refuse foreign model_dirs, never save NaNs."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import tensorflow as tf
from absl import logging

from trainer.errors import ConfigError
from trainer.penalties.selection import variable_path
from trainer.run import files

METADATA = "tapeloop.json"


def variable_table(variables: Sequence[Any]) -> list[list[Any]]:
    """`[[path, shape], ...]`: what a checkpoint's model must match to be restored."""
    return [[variable_path(v), list(v.shape)] for v in variables]


class Checkpointer:
    """Saves and restores a training run in `directory` with `tf.train.CheckpointManager`.

    The checkpoint lists the model's variables explicitly (`tf.train.Checkpoint(model=...)`
    silently misses layers kept in Python lists and Keras seed-generator state), and holds the
    optimizer's variables, the step, each penalty's state keyed by the penalty's name (so
    that penalties may be added, removed or reordered between runs) and, when given, the
    input iterator. A `tapeloop.json` beside it records the task, the model's variable table
    and the run's settings: a `model_dir` written by another task or model is refused when
    the Checkpointer is made, and `saved_settings` lets a resumed run say what changed.

    A missing, empty or garbled `checkpoint` state file beside checkpoint files is rebuilt
    from the files (the newest readable checkpoint becomes the latest), never ignored.

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
      ConfigError: `directory` holds a run of another task or model, or checkpoints of which
        none is readable and no valid state file.
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
        self._core = {"model_variables": self._model_variables, **objects}
        self._penalties = {name: list(v) for name, v in (penalty_states or {}).items() if v}
        self._checkpoint = tf.train.Checkpoint(**self._core, penalties=dict(self._penalties))
        self.saved_settings = self._check_metadata()
        if chief:
            self._recover_state_file()
        write_dir = directory if chief else tempfile.mkdtemp(prefix="tapeloop_worker_")
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, write_dir, max_to_keep=max_to_keep
        )
        self._reader = tf.train.CheckpointManager(self._checkpoint, directory, max_to_keep=None)

    def track(self, name: str, trackable: Any, restore: bool = True) -> None:
        """Adds `trackable` (e.g. the input iterator) to what is saved, and to what is
        restored unless `restore` is False (it then keeps its current state)."""
        if restore:
            self._core[name] = trackable
        setattr(self._checkpoint, name, trackable)

    @property
    def latest(self) -> str | None:
        """The checkpoint a restore without `resume_from` would use, if any."""
        return self._reader.latest_checkpoint

    def _check_metadata(self) -> dict[str, Any] | None:
        """The settings of the run recorded here (None without a record), after checking
        that it is this task's run of this model."""
        saved = files.read_json(files.join(self.directory, METADATA))
        if saved is None:
            return None
        if not isinstance(saved, dict):
            raise ConfigError(
                f"`model_dir` ({self.directory!r}) has a {METADATA} that is not a tapeloop run's; "
                "use another --model_dir."
            )
        if saved.get("task") != self._metadata["task"]:
            raise ConfigError(
                f"`model_dir` ({self.directory!r}) holds a run of task {saved.get('task')!r}, "
                f"not {self._metadata['task']!r}; use another --model_dir."
            )
        if saved.get("variables") != self._metadata["variables"]:
            before = dict(saved.get("variables", []))
            now = dict(self._metadata["variables"])
            diffs = [
                f"{p}: {before.get(p)} -> {now.get(p)}"
                for p in {*before, *now}
                if before.get(p) != now.get(p)
            ]
            raise ConfigError(
                f"`model_dir` ({self.directory!r}) holds a different model "
                f"({'; '.join(sorted(diffs)[:3])}); use another --model_dir."
            )
        return saved.get("settings")

    def _checkpoint_files(self) -> list[str]:
        """The checkpoint prefixes in `directory`, oldest step first."""
        found = []
        for index in tf.io.gfile.glob(files.join(self.directory, "ckpt-*.index")):
            match = re.search(r"ckpt-(\d+)\.index$", index)
            if match:
                found.append((int(match.group(1)), index[: -len(".index")]))
        return [path for _, path in sorted(found)]

    def _recover_state_file(self) -> None:
        """Rebuilds a missing, empty or garbled state file from the checkpoint files."""
        found = self._checkpoint_files()
        if not found:
            return
        try:
            state = tf.train.get_checkpoint_state(self.directory)
            if state is not None and state.model_checkpoint_path:
                return
        except Exception:  # a garbled file fails in several ways, all handled
            pass
        readable = [p for p in reversed(found) if readable_checkpoint(p)]
        names = ", ".join(os.path.basename(p) for p in found)
        if not readable:
            raise ConfigError(
                f"`model_dir` ({self.directory!r}) has no valid 'checkpoint' state file and none "
                f"of its checkpoints ({names}) is readable; use another --model_dir."
            )
        latest = readable[0]
        kept = found[: found.index(latest) + 1]
        tf.compat.v1.train.update_checkpoint_state(
            self.directory, latest, all_model_checkpoint_paths=kept
        )
        logging.warning(
            "The 'checkpoint' state file in %s was missing or damaged; rebuilt it from the files "
            "(%s): resuming from %s, the newest readable.",
            self.directory,
            names,
            latest,
        )

    def restore(self, resume_from: str | None = None) -> bool:
        """Restores `resume_from`, else the latest checkpoint; False when there is none.

        Penalty state is restored for the penalties the checkpoint holds (by name); a penalty
        it does not hold keeps its initial state, which is logged.

        Raises:
          ConfigError: `resume_from` does not exist; the checkpoint is unreadable (the
            message names the newest other checkpoint that is readable, if any), or it does
            not match this run (what differs).
        """
        path = resume_from or self._reader.latest_checkpoint
        if resume_from and not tf.io.gfile.glob(resume_from + ".index"):
            raise ConfigError(
                f"`resume_from` ({resume_from!r}) is not a checkpoint; "
                f"checkpoints here: {', '.join(self._checkpoint_files()) or 'none'}."
            )
        if path is None:
            return False
        if not readable_checkpoint(path):
            others = [p for p in reversed(self._checkpoint_files()) if p != path]
            good = next((p for p in others if readable_checkpoint(p)), None)
            hint = f"; rerun with --resume_from={good}" if good else "; no other one is readable"
            raise ConfigError(f"Checkpoint {path!r} is unreadable (damaged files){hint}.")
        present = {
            key.split("/")[1]
            for key in _reader(path).get_variable_to_shape_map()
            if key.startswith("penalties/")
        }
        try:
            restored = {n: v for n, v in self._penalties.items() if n in present}
            for root in (
                tf.train.Checkpoint(**self._core),
                tf.train.Checkpoint(penalties=restored),
            ):
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
        for name in sorted(set(self._penalties) - present):
            logging.info(
                "Penalty %s has no state in %s: it starts from its initial state.", name, path
            )
        logging.info("Restored %s", path)
        return True

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
