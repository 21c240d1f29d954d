"""Stop requests: SIGTERM and SIGINT caught in the main thread while training runs."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

# What a shell reports for a process ended by Ctrl-C; the CLI's status after a SIGINT.
INTERRUPTED_EXIT_STATUS = 128 + signal.SIGINT
_CAUGHT = (signal.SIGTERM, signal.SIGINT)


class _Dropped:
    """KeyboardInterrupts Python dropped inside `remembered_interrupts`: how many blocks are
    open, and whether one was dropped and not raised again yet."""

    depth = 0
    pending = False


@contextlib.contextmanager
def remembered_interrupts() -> Iterator[None]:
    """A block in which a Ctrl-C that Python drops is remembered, to be raised again.

    Python runs the SIGINT handler between any two bytecodes of the main thread, also inside
    a `__del__` or a weakref callback (TensorFlow runs many as its objects are collected); the
    KeyboardInterrupt raised there cannot propagate: Python prints `Exception ignored in ...`
    with its traceback and goes on, and a run would train to its end as if no Ctrl-C had
    come. In this block such a KeyboardInterrupt is kept, silently, instead; `StopSignals`
    raises it again where it begins (nothing trained yet), and `raise_dropped_interrupt`
    wherever its caller asks. Other unraisable exceptions go to the hook as before. Blocks
    nest: the outermost one installs the hook, and forgets what was left on exit.

    Yields:
      None.
    """
    previous = sys.unraisablehook
    outermost = _Dropped.depth == 0
    if outermost:
        _Dropped.pending = False

        def hook(unraisable: Any) -> None:
            if unraisable.exc_type is KeyboardInterrupt:
                _Dropped.pending = True
            else:
                previous(unraisable)

        sys.unraisablehook = hook
    _Dropped.depth += 1
    try:
        yield
    finally:
        _Dropped.depth -= 1
        if outermost:
            sys.unraisablehook = previous
            _Dropped.pending = False


def raise_dropped_interrupt() -> None:
    """Raises KeyboardInterrupt if Python dropped one in a `remembered_interrupts` block and
    it was not raised again yet; else does nothing.

    Raises:
      KeyboardInterrupt: a dropped one, once.
    """
    if _Dropped.pending:
        _Dropped.pending = False
        raise KeyboardInterrupt


class StopSignals:
    """A context manager in which SIGTERM and SIGINT ask for a stop instead of ending the run.

    The first of them sets `requested`; the training loop reads it at its next boundary,
    saves and stops. A SIGINT after that (Ctrl-C pressed twice) ends the process at once, with
    one line on stderr and exit status `INTERRUPTED_EXIT_STATUS` (130), even while the main
    thread is inside a compiled loop: Python's signal wakeup fd wakes a watcher thread, which
    does not wait for the main thread. Further SIGTERMs change nothing.

    Handlers can only be installed in the main thread: elsewhere nothing is caught and
    `requested` stays None. A signal ignored when the block starts (SIG_IGN, such as SIGINT
    in a background job) stays ignored. On exit the previous handlers are restored, as Python
    knows them: one installed outside Python (such as TensorFlow's) is not seen, and what
    Python had set before it (normally the default action) is restored in its place.

    Attributes:
      requested: `signal.SIGTERM` or `signal.SIGINT`, whichever arrived first; None before.
    """

    def __init__(self):
        self.requested: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._arrivals = 0
        self._pipe: tuple[int, int] | None = None
        self._previous_wakeup_fd = -1
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> StopSignals:
        raise_dropped_interrupt()  # a Ctrl-C Python dropped before: nothing was trained yet
        if threading.current_thread() is not threading.main_thread():
            return self
        caught = [s for s in _CAUGHT if signal.getsignal(s) is not signal.SIG_IGN]
        if not caught:
            return self
        self._pipe = os.pipe()
        os.set_blocking(self._pipe[1], False)  # set_wakeup_fd needs it; a full pipe drops bytes
        self._watcher = threading.Thread(
            target=self._watch, args=(self._pipe[0],), name="StopSignals", daemon=True
        )
        self._watcher.start()
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        for s in caught:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            os.close(self._pipe[1])  # the watcher reads the end of the pipe and returns
            self._watcher.join()
            os.close(self._pipe[0])
            self._pipe = self._watcher = None

    def _handle(self, signum: int, frame: Any) -> None:
        """Runs in the main thread: records the first signal (the watcher counts them all)."""
        del frame
        if self.requested is None:
            self.requested = signal.Signals(signum)

    def _watch(self, fd: int) -> None:
        """Reads the signal numbers Python's C handler writes to the wakeup fd as they arrive."""
        while data := os.read(fd, 64):
            for signum in data:
                if signum in _CAUGHT:
                    self._arrivals += 1
                    if signum == signal.SIGINT and self._arrivals > 1:
                        _exit_at_once()


def _exit_at_once() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os.write(2, b"trainer: Interrupted again (SIGINT): exiting at once, without saving.\n")
    os._exit(INTERRUPTED_EXIT_STATUS)
