"""Checkpoints that hold everything a resume needs, refuse foreign model_dirs, never save NaNs."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import tensorflow as tf
from absl import logging

from trainer import files
from trainer.errors import ConfigError
from trainer.selection import variable_path

METADATA = "tapeloop.json"


def variable_table(variables: Sequence[Any]) -> list[list[Any]]:
    """`[[path, shape], ...]`: what a checkpoint's model must match to be restored."""
    return [[variable_path(v), list(v.shape)] for v in variables]


class Checkpointer:
    """Saves and restores a training run in `directory` with `tf.train.CheckpointManager`.

    The checkpoint lists the model's variables explicitly (`tf.train.Checkpoint(model=...)`
    silently misses layers kept in Python lists and Keras seed-generator state), and holds the
    optimizer's variables, the step, penalty strengths and, when given, the input iterator.
    A `tapeloop.json` beside it records the task and the model's variable table, so that a
    `model_dir` written by another task or model is refused, when the Checkpointer is made,
    with a clear message.

    Args:
      directory: the run's `model_dir`.
      task: the task's name, recorded and checked.
      model_variables: all of the model's variables (trainable or not).
      objects: other trackables by name (optimizer variables, step, strengths); more can be
        added with `track` before `restore`.
      chief: whether this process owns `directory`; other workers of a multi-worker run write
        to a temporary directory that is removed at `close()`, and restore from `directory`.
      max_to_keep: checkpoints kept.

    Raises:
      ConfigError: `directory` holds a run of another task or model.
    """

    def __init__(
        self,
        directory: str,
        *,
        task: str,
        model_variables: Sequence[Any],
        objects: dict[str, Any],
        chief: bool = True,
        max_to_keep: int = 3,
    ):
        self.directory = directory
        self.chief = chief
        self._metadata = {"task": task, "variables": variable_table(model_variables)}
        self._model_variables = list(model_variables)
        self._checkpoint = tf.train.Checkpoint(model_variables=self._model_variables, **objects)
        write_dir = directory if chief else tempfile.mkdtemp(prefix="tapeloop_worker_")
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, write_dir, max_to_keep=max_to_keep
        )
        self._reader = tf.train.CheckpointManager(self._checkpoint, directory, max_to_keep=None)
        self._check_metadata()

    def track(self, name: str, trackable: Any) -> None:
        """Adds `trackable` (e.g. the input iterator) to what is saved and restored."""
        setattr(self._checkpoint, name, trackable)

    def _check_metadata(self) -> None:
        saved = files.read_json(files.join(self.directory, METADATA))
        if saved is None:
            return
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
            diffs = [f"{p}: {before.get(p)} -> {now.get(p)}" for p in {*before, *now}
                     if before.get(p) != now.get(p)]  # fmt: skip
            raise ConfigError(
                f"`model_dir` ({self.directory!r}) holds a different model "
                f"({'; '.join(sorted(diffs)[:3])}); use another --model_dir."
            )

    def restore(self, resume_from: str | None = None) -> bool:
        """Restores `resume_from`, else the latest checkpoint; False when there is none.

        Raises:
          ConfigError: `resume_from` does not exist, or the checkpoint is unreadable (the
            message names an older one to resume from).
        """
        path = resume_from or self._reader.latest_checkpoint
        if resume_from and not tf.io.gfile.glob(resume_from + ".index"):
            raise ConfigError(
                f"`resume_from` ({resume_from!r}) is not a checkpoint; "
                f"checkpoints here: {', '.join(self._reader.checkpoints) or 'none'}."
            )
        if path is None:
            return False
        try:
            self._checkpoint.restore(path).assert_existing_objects_matched()
        except Exception as e:  # damaged files fail in many ways; all are reported
            older = [p for p in self._reader.checkpoints if p != path]
            hint = f"; rerun with --resume_from={older[-1]}" if older else ""
            reason = str(e).strip().splitlines()[0][:200]
            raise ConfigError(
                f"Checkpoint {path!r} is unreadable ({type(e).__name__}: {reason}){hint}."
            ) from None
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

    def close(self) -> None:
        """Removes a non-chief worker's temporary checkpoints."""
        if not self.chief:
            shutil.rmtree(self._manager.directory, ignore_errors=True)
