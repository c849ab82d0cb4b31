"""Values as a person writes them, for what ctm prints: sizes in KiB/MiB, whole numbers without `.0`, lists and
mappings without Python's brackets and quotes. Plain functions of values; no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def size(count: int) -> str:
    """A byte count in binary units: `512 B`, `2.3 MiB`."""
    value, unit = float(count), _UNITS[0]
    for bigger in _UNITS[1:]:
        if abs(value) < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"


def number(value: float) -> str:
    """A number in its shortest exact-enough form: `1`, `0.25`, `1e-06`; a whole float prints as an integer."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    return f"{value:.4g}"


def count(value: int) -> str:
    """A large whole number with thousands separators: `1,234,567`."""
    return f"{value:,}"


def value(item: Any) -> str:
    """Any config or settings value: numbers as `number`, None as `none`, lists comma-separated, mappings as
    `key=value` pairs, strings as they are."""
    if item is None:
        return "none"
    if isinstance(item, bool | int | float):
        return number(item)
    if isinstance(item, Mapping):
        return ", ".join(f"{key}={value(inner)}" for key, inner in item.items()) or "none"
    if isinstance(item, list | tuple | set | frozenset):
        return ", ".join(value(inner) for inner in item) or "none"
    return str(item)
