"""The registry of single-file key styles (kohya, diffusers): how a tensor key splits into (module, factor role), how
merged factors are written back, and which style a file's keys are in. The order of STYLES is the order of
detection: the first style that reads every key of a file is the file's style."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

# Write one merged module: (module name, A (r × in·k·k), B (out × r), weight shape or None) -> tensors by key.
Writer = Callable[[str, torch.Tensor, torch.Tensor, "tuple[int, ...] | None"], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Style:
    """A key style: its name, how it splits a key (None: not a key of this style), and how it writes a module."""

    name: str
    split: Callable[[str], tuple[str, str] | None]
    write: Writer
    doc: str


STYLES: dict[str, Style] = {}


def register(style: Style) -> Style:
    """Add a style to the registry (in detection order)."""
    STYLES[style.name] = style
    return style


def detect(keys: Iterable[str]) -> Style | None:
    """The first style that reads every key, or None."""
    names = list(keys)
    return next((style for style in STYLES.values() if names and all(map(style.split, names))), None)


def shaped(a: torch.Tensor, b: torch.Tensor, weight_shape: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged (A, B) in a convolution's layout where the module is one: A as (r, in, k, ...), B as (out, r, 1, ...)."""
    if weight_shape is None or len(weight_shape) <= 2:
        return a, b
    ones = (1,) * (len(weight_shape) - 2)
    return a.reshape(a.shape[0], *weight_shape[1:]), b.reshape(*b.shape, *ones)
