"""Files in run directories through `tf.io.gfile`: local paths and URLs (gs://, ram://) alike."""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from trainer.errors import ConfigError


class WriteError(OSError):
    """A write into a run's directory failed: a full disk, a read-only or vanished path.

    The CLI prints its message as one line and exits with status 1.
    """


def reason(error: BaseException) -> str:
    """An I/O error's cause in one short line: TensorFlow's op prefix dropped, the end of a
    long message kept (where "No space left on device" and the like stand)."""
    text = getattr(error, "message", None) or getattr(error, "strerror", None) or str(error)
    text = " ".join(re.sub(r"\{\{.*?\}\}", "", text).split())
    return text if len(text) <= 200 else "..." + text[-200:]


def writing(what: str, write: Callable[[], Any]) -> Any:
    """`write()`, with a failed write (a full disk, a read-only or vanished directory) turned
    into one `WriteError` line naming what was being written."""
    try:
        return write()
    except (tf.errors.OpError, OSError) as e:
        if isinstance(e, WriteError):
            raise
        raise WriteError(f"Could not write {what}: {reason(e)}") from None


def join(directory: str, *names: str) -> str:
    """`directory/name...`; for URLs too (`os.path.join` on a URL works, but says why)."""
    return "/".join([directory.rstrip("/"), *names])


def writable_dir(argument: str, directory: str) -> str:
    """Creates `directory` if needed and checks that a file can be written in it.

    Raises:
      ConfigError: naming `argument` and the directory, when it cannot be written.
    """
    probe = join(directory, f".write_test_{uuid.uuid4().hex}")
    try:
        tf.io.gfile.makedirs(directory)
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("")
        tf.io.gfile.remove(probe)
    except (tf.errors.OpError, OSError) as e:
        raise ConfigError(f"`{argument}` ({directory!r}) is not writable: {reason(e)}.") from None
    return directory


def _finite(value: Any) -> Any:
    """`value` with non-finite floats as None (null): strict JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: str, value: Any) -> None:
    """Writes `value` as strict JSON to `path` atomically: a temporary file, then a rename,
    so that a crash or a full disk never leaves a truncated file behind."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with tf.io.gfile.GFile(temporary, "w") as f:
            f.write(json.dumps(_finite(value), indent=2, allow_nan=False))
        tf.io.gfile.rename(temporary, path, overwrite=True)
    finally:
        if tf.io.gfile.exists(temporary):
            tf.io.gfile.remove(temporary)


def read_json(path: str) -> Any | None:
    """The JSON value in `path`, or None when there is no such file.

    Raises:
      ConfigError: the file exists but is not valid JSON.
    """
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path!r} is not valid JSON ({e.msg}); remove it or use another directory."
        ) from None
