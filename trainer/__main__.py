"""`python -m trainer` and the `tapeloop` console script: the command line, with a Ctrl-C
while TensorFlow loads ended by one line too; `--help` lists tapeloop's flags."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from trainer.run.signals import (
    INTERRUPTED_EXIT_STATUS,
    raise_dropped_interrupt,
    remembered_interrupts,
)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command line (`trainer.cli.main.run`), importing it first.

    The import (TensorFlow's: seconds) is guarded here, in a module that imports none, so
    that a Ctrl-C during it ends with one line and exit status 130, as one at any later
    moment does (`run` says where it came and what is left).

    Args:
      argv: the command line, the program's name first; None reads `sys.argv`.

    Raises:
      SystemExit: always, with the exit status (see `trainer.cli.main.run`).
    """
    try:
        with remembered_interrupts():  # one Python drops (`Exception ignored`) is not lost
            try:
                from trainer.cli.main import run

                raise_dropped_interrupt()
            except KeyboardInterrupt:
                print("trainer: Interrupted (SIGINT) during start-up; nothing was trained.",
                      file=sys.stderr)  # fmt: skip
                sys.exit(INTERRUPTED_EXIT_STATUS)
            run(argv)
    finally:  # a Ctrl-C while the process exits ends it at once, without a traceback
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    main()
