"""Typed parameters of rules and methods: frozen dataclasses whose fields carry a range and a meaning.

A rule or method declares its parameters as a `Params` subclass; `--param NAME=VALUE` (and a recipe's `params`)
give them by name, and `Params.resolve` checks every value against its range and builds the object (integer
parameters as ints). A field named with a trailing underscore (`lambda_`) is given without it (`lambda`). A
`Params` object also reads as a mapping of those names to values, which is how reports and recipes record it.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ctm_cli.errors import UsageError


@dataclass(frozen=True)
class Param:
    """A parameter's default, allowed range (closed unless marked open) and meaning."""

    default: float
    low: float
    high: float
    doc: str
    integer: bool = False
    open_low: bool = False
    open_high: bool = False

    def range_text(self) -> str:
        """The allowed range as people write it, e.g. `[0, 1)` or `{0, 1}`."""
        if self.integer and self.high - self.low <= 4:
            return "{" + ", ".join(str(v) for v in range(int(self.low), int(self.high) + 1)) + "}"
        if self.integer:
            return f"{{{int(self.low)}, …, {int(self.high)}}}"
        return f"{'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"

    def allows(self, value: float) -> bool:
        """Whether `value` lies in the range (and is whole, for integer parameters)."""
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below and (not self.integer or float(value).is_integer())


def param(default: float, low: float, high: float, doc: str, *, open_low: bool = False, open_high: bool = False) -> Any:
    """A field of a `Params` dataclass: its default, range and meaning (integer-ness comes from the field's type)."""
    spec = {"default": default, "low": low, "high": high, "doc": doc, "open_low": open_low, "open_high": open_high}
    return dataclasses.field(default=default, metadata={"param": spec})


P = TypeVar("P", bound="Params")


@dataclass(frozen=True)
class Params(Mapping[str, float]):
    """Base of every parameter set, and itself the empty set (for rules and methods that take none)."""

    @classmethod
    def specs(cls) -> dict[str, Param]:
        """Every parameter by the name it is given with, in declaration order."""
        return {name: spec for name, (_, spec) in _fields(cls).items()}

    @classmethod
    def resolve(cls: type[P], owner: str, given: Mapping[str, float]) -> P:
        """The parameters with `given` values (by name) over the defaults; a value out of range is refused naming
        `owner` and the range. Names not in this set are ignored (the caller splits them between owners)."""
        values: dict[str, Any] = {}
        for name, (attribute, spec) in _fields(cls).items():
            value = given.get(name, spec.default)
            if not spec.allows(value):
                raise UsageError(f"{owner}: {name}={value:g} is out of range; allowed: {spec.range_text()}")
            values[attribute] = int(value) if spec.integer else float(value)
        return cls(**values)

    def __getitem__(self, name: str) -> float:
        return getattr(self, _fields(type(self))[name][0])

    def __iter__(self) -> Iterator[str]:
        return iter(_fields(type(self)))

    def __len__(self) -> int:
        return len(_fields(type(self)))


@functools.cache
def _fields(cls: type[Params]) -> dict[str, tuple[str, Param]]:
    """A parameter set's public name → (attribute, spec), in declaration order."""
    hints = typing.get_type_hints(cls)
    return {
        field.name.removesuffix("_"): (field.name, Param(**field.metadata["param"], integer=hints[field.name] is int))
        for field in dataclasses.fields(cls)
    }
