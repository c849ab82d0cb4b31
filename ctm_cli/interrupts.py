"""Interruptions of a run: SIGTERM (what `timeout`, docker and batch schedulers send) handled like Ctrl-C, and
the one line that tells the user what state the output is in afterwards."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from ctm_cli.errors import EXIT_INTERRUPTED, EXIT_TERMINATED

# The attribute an interrupt carries once the output has been written (its path).
_WRITTEN = "ctm_output_written"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread runs, like Ctrl-C's KeyboardInterrupt, so that cleanup runs."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` instead of killing the process (in the main thread; elsewhere
    signal handlers cannot be set and nothing changes). The previous handler is restored on leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def output_written(path: Path) -> Iterator[None]:
    """Mark an interrupt raised inside as coming after the output at `path` was written."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        setattr(interrupt, _WRITTEN, path)
        raise


def interruption(interrupt: KeyboardInterrupt) -> tuple[str, int]:
    """What to tell the user after `ctm: `, and the exit code: 130 for Ctrl-C, 143 (128 + 15) for SIGTERM; the
    message says whether the output was already written."""
    how = "interrupted (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
    code = EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
    written = getattr(interrupt, _WRITTEN, None)
    if written is None:
        return f"{how}; nothing was written", code
    return f"{how} after the output was written to {written}", code
