"""One run per model_dir: a lock file, through `tf.io.gfile`, naming its holder."""

from __future__ import annotations

import datetime
import os
import socket
import time
import uuid

import tensorflow as tf
from absl import logging

from trainer.errors import ConfigError
from trainer.run import files
from trainer.run.callbacks import Callback

NAME = "tapeloop.lock"
# A lock held from another host is judged stale when its holder has not refreshed it for this
# long (holders refresh it at least every REFRESH_S while they train). On the same host, a lock
# whose process is gone is stale at once.
STALE_AFTER_S = 600
REFRESH_S = 60


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    """Refuses a second writer on a `model_dir` while a run holds it.

    The lock is `<model_dir>/tapeloop.lock`: the holder's host, pid, start time and a token.
    A lock is stale, and taken over with a warning, when its process is gone (same host) or
    it was not refreshed for `STALE_AFTER_S` seconds (another host).

    Args:
      directory: the run's `model_dir`.
    """

    def __init__(self, directory: str):
        self.path = files.join(directory, NAME)
        self.directory = directory
        self._token = uuid.uuid4().hex
        self._refreshed = 0.0
        self._since = ""

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            return not isinstance(pid, int) or pid == os.getpid() or not _alive(pid)
        updated = holder.get("updated")
        return not isinstance(updated, (int, float)) or time.time() - updated > STALE_AFTER_S

    def _write(self) -> None:
        files.write_json(
            self.path,
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": self._since,
                "updated": time.time(),
                "token": self._token,
            },
        )
        self._refreshed = time.monotonic()

    def acquire(self) -> None:
        """Takes the lock.

        Raises:
          ConfigError: a live run holds it (the message names its host, pid and start).
        """
        try:
            holder = files.read_json(self.path)
        except ConfigError:  # a damaged lock file protects nothing
            holder = {}
        if isinstance(holder, dict) and holder and not self._stale(holder):
            raise ConfigError(
                f"`model_dir` ({self.directory!r}) is in use by pid {holder.get('pid')} on "
                f"{holder.get('host')} since {holder.get('since')}; wait for that run to end, or "
                f"remove {self.path} if it is gone."
            )
        if isinstance(holder, dict) and holder:
            logging.warning(
                "Taking over the stale lock of pid %s on %s (since %s).",
                holder.get("pid"),
                holder.get("host"),
                holder.get("since"),
            )
        self._since = datetime.datetime.now().isoformat(timespec="seconds")
        self._write()
        if (files.read_json(self.path) or {}).get("token") != self._token:
            raise ConfigError(f"`model_dir` ({self.directory!r}) was just taken by another run.")

    def refresh(self) -> None:
        """Rewrites the lock's time, at most every `REFRESH_S` seconds."""
        if time.monotonic() - self._refreshed >= REFRESH_S:
            self._write()

    def release(self) -> None:
        """Removes the lock if this run still holds it."""
        try:
            if (files.read_json(self.path) or {}).get("token") == self._token:
                tf.io.gfile.remove(self.path)
        except (ConfigError, tf.errors.OpError, OSError):
            pass  # nothing to release, or nowhere to release it: the lock is stale either way


class RefreshLock(Callback):
    """Refreshes the run's lock after each loop (at most every `REFRESH_S` seconds).

    Args:
      lock: the lock this run holds.
    """

    def __init__(self, lock: RunLock):
        self.lock = lock

    def on_loop_end(self, step: int, logs: dict[str, float]) -> None:
        files.writing(self.lock.path, self.lock.refresh)
