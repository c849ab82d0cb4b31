"""Progress of a merge as events: which stage runs (reading the inputs, merging the waves, HOOI's sweeps, writing)
and how far it is, sent to whoever listens (the command line's display). The engine and the math send them and
draw nothing; with no listener, sending costs a function call."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    """One step of a stage: `done` of `total` units (total None where unknown, as for HOOI's sweeps), or, with
    `added`, `done` more units than at the last event; and what the stage is doing now in words (`detail`)."""

    stage: str  # "reading", "core spaces", "HOOI", "merging", "writing"
    done: float
    total: float | None
    unit: str = ""  # "bytes", "modules", "sweeps"
    detail: str = ""
    added: bool = False


Listener = Callable[[Event], None]
_listeners: list[Listener] = []


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send every event to `listener` while the block runs (from any thread: the inputs are read in the
    background, so a listener must be thread-safe)."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def emit(stage: str, done: float, total: float | None, unit: str = "", detail: str = "") -> None:
    """Tell the listeners, if any, how far `stage` is."""
    _send(Event(stage, done, total, unit, detail))


def add(stage: str, count: float, unit: str = "") -> None:
    """Tell the listeners, if any, that `stage` did `count` more units (a stage whose total only its caller
    knows: the core spaces, built group by group)."""
    _send(Event(stage, count, None, unit, added=True))


def _send(event: Event) -> None:
    for listener in list(_listeners):
        listener(event)
