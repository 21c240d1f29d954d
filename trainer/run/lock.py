"""One run per model_dir: a lock file, created exclusively, naming its holder."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import tensorflow as tf
from absl import logging

from trainer.errors import ConfigError
from trainer.run import files
from trainer.run.callbacks import Callback

NAME = "tapeloop.lock"
# Serialises the takeovers of a stale lock (a kernel lock on it, released if its taker dies).
TAKEOVER = "tapeloop.lock.takeover"
# A lock held from another host is judged stale when its holder has not refreshed it for this
# long (holders refresh it at least every REFRESH_S while they train). On the same host, a lock
# whose process is gone is stale at once.
STALE_AFTER_S = 600
REFRESH_S = 60

# The tokens of the locks this process holds: a lock naming this pid is this process's own
# only if its token is here (else it was left by an earlier process that had the same pid, as
# in a restarted container).
_HELD: set[str] = set()
_HELD_GUARD = threading.Lock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _local(path: str) -> bool:
    return "://" not in path


class RunLock:
    """Refuses a second writer on a `model_dir` while a run holds it.

    The lock is `<model_dir>/tapeloop.lock`: the holder's host, pid, start time, last refresh
    and a token.

    Taking it: on a local path (NFS included) the holder's record is written to a file of
    its own and hard-linked to the lock's name, which fails if the name exists: an atomic
    create-exclusive, as `open(O_CREAT | O_EXCL)`, that never shows a half-written lock (where
    hard links are not supported, it is `os.open(O_CREAT | O_EXCL)` and a write). On a URL
    (`gs://`, `ram://`: `tf.io.gfile` has no exclusive create) the record is written, then
    read back to check that no other run's replaced it: best effort, as two runs starting
    within the same moment can both pass.

    The stale-lock rule: a lock is stale when its process is gone (a lock naming this host;
    at once) or when its holder has not refreshed it for `STALE_AFTER_S` seconds (a lock from
    another host; holders refresh it at least every `REFRESH_S` seconds while they train); a
    lock file that is not a valid record is stale too. A stale lock is taken over with a
    warning naming its holder. Takers hold an exclusive kernel lock (`flock`) on
    `tapeloop.lock.takeover` (removed after) while they judge, remove and re-create the
    lock, so of several runs taking over one stale lock at once exactly one wins; the others
    find its lock live and are refused. A holder that lost its lock (paused for longer than
    `STALE_AFTER_S`) stops refreshing it, with a warning.

    Args:
      directory: the run's `model_dir`.
    """

    def __init__(self, directory: str):
        self.path = files.join(directory, NAME)
        self.directory = directory
        self._token = uuid.uuid4().hex
        self._refreshed = 0.0
        self._since = ""
        self._lost = False

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one.

        Raises:
          ConfigError: a live run holds it (the message names its host, pid and start).
        """
        self._since = datetime.datetime.now().isoformat(timespec="seconds")
        with _HELD_GUARD:  # before the lock exists: another thread may judge it at once
            _HELD.add(self._token)
        try:
            if _local(self.path):
                self._acquire_local()
            else:
                self._acquire_url()
        except BaseException:
            with _HELD_GUARD:
                _HELD.discard(self._token)
            raise

    def refresh(self) -> None:
        """Rewrites the lock's time, at most every `REFRESH_S` seconds, while this run still
        holds it."""
        if self._lost or time.monotonic() - self._refreshed < REFRESH_S:
            return
        holder = self._read() or {}
        if holder.get("token") != self._token:
            self._lost = True
            logging.warning(
                "The lock of `model_dir` (%r) is no longer this run's (it now names pid %s on "
                "%s, since %s): judged stale, it was taken over or removed; this run stops "
                "refreshing it.",
                self.directory,
                holder.get("pid"),
                holder.get("host"),
                holder.get("since"),
            )
            return
        files.write_json(self.path, self._record())
        self._refreshed = time.monotonic()

    def release(self) -> None:
        """Removes the lock if this run still holds it."""
        with _HELD_GUARD:
            _HELD.discard(self._token)
        try:
            if (self._read() or {}).get("token") == self._token:
                tf.io.gfile.remove(self.path)
        except (tf.errors.OpError, OSError):
            pass  # nothing to release, or nowhere to release it: the lock is stale either way

    def _record(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": self._since,
            "updated": time.time(),
            "token": self._token,
        }

    def _read(self) -> dict[str, Any] | None:
        """The lock's record: None when there is no lock, `{}` when it is not a valid record
        (a damaged lock protects nothing)."""
        try:
            holder = files.read_json(self.path)
        except tf.errors.NotFoundError:  # removed since `read_json` found it
            return None
        except ConfigError:
            return {}
        return holder if isinstance(holder, dict) or holder is None else {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            if pid == os.getpid():
                with _HELD_GUARD:
                    return holder.get("token") not in _HELD
            return not isinstance(pid, int) or not _alive(pid)
        updated = holder.get("updated")
        return not isinstance(updated, (int, float)) or time.time() - updated > STALE_AFTER_S

    def _refuse(self, holder: dict[str, Any]) -> ConfigError:
        return ConfigError(
            f"`model_dir` ({self.directory!r}) is in use by pid {holder.get('pid')} on "
            f"{holder.get('host')} since {holder.get('since')}; wait for that run to end, or "
            f"remove {self.path} if it is gone."
        )

    def _taking_over(self, holder: dict[str, Any]) -> None:
        if holder:
            logging.warning(
                "Taking over the stale lock of pid %s on %s (since %s).",
                holder.get("pid"),
                holder.get("host"),
                holder.get("since"),
            )
        else:
            logging.warning("Taking over the damaged lock %s.", self.path)

    def _acquire_local(self) -> None:
        if self._create():
            return
        holder = self._read()
        if holder and not self._stale(holder):
            raise self._refuse(holder)
        with _takeover_guard(files.join(self.directory, TAKEOVER)):
            holder = self._read()
            if holder is not None:  # else its holder released it meanwhile
                if not self._stale(holder):
                    raise self._refuse(holder)
                self._taking_over(holder)
                with contextlib.suppress(FileNotFoundError):  # released meanwhile
                    os.remove(self.path)
            if not self._create():  # a new run took it since it was removed
                raise self._refuse(self._read() or {})

    def _create(self) -> bool:
        """Creates the lock with this run's record; False if it exists."""
        record = json.dumps(self._record(), indent=2)
        own = f"{self.path}.{self._token}"
        with open(own, "w") as f:
            f.write(record)
        try:
            os.link(own, self.path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system (vfat, some FUSE mounts)
            return self._create_by_open(record)
        finally:
            os.remove(own)
        self._refreshed = time.monotonic()
        return True

    def _create_by_open(self, record: str) -> bool:
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as f:
            f.write(record)
        self._refreshed = time.monotonic()
        return True

    def _acquire_url(self) -> None:
        holder = self._read()
        if holder is not None:
            if not self._stale(holder):
                raise self._refuse(holder)
            self._taking_over(holder)
        files.write_json(self.path, self._record())
        self._refreshed = time.monotonic()
        if (self._read() or {}).get("token") != self._token:
            raise ConfigError(f"`model_dir` ({self.directory!r}) was just taken by another run.")


@contextlib.contextmanager
def _takeover_guard(path: str) -> Iterator[None]:
    """An exclusive `flock` on the file `path` for the block; the kernel releases it if this
    process dies. The file is removed after (a waiter that then holds the removed file tries
    again on a new one). Where the file system has no such locks, nothing is held."""
    while True:
        descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError as e:  # ENOLCK and the like: takeovers are then best effort
            logging.warning("No exclusive lock on %s (%s).", path, files.reason(e))
            break
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)  # its holder removed it when done: that lock guards nothing now
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        os.close(descriptor)


class RefreshLock(Callback):
    """Refreshes the run's lock after each loop (at most every `REFRESH_S` seconds).

    Args:
      lock: the lock this run holds.
    """

    def __init__(self, lock: RunLock):
        self.lock = lock

    def on_loop_end(self, step: int, logs: dict[str, float]) -> None:
        files.writing(self.lock.path, self.lock.refresh)
