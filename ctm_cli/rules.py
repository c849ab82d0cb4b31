"""Registry of merging rules: pure functions on a stack of same-shaped matrices; no I/O.

A rule takes `stack` (..., T, m, n), `weights` (T,), its parameters and a torch.Generator, and
returns the merged (..., m, n) matrix. The same rule runs on r × r coordinates (ctm), R × R cores
(core) or full out × in updates (mtc).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ctm_cli.errors import UsageError

RuleFunction = Callable[[torch.Tensor, torch.Tensor, dict[str, float], torch.Generator | None], torch.Tensor]


@dataclass(frozen=True)
class Param:
    """A rule parameter: default value, allowed closed range and a one-line meaning."""

    default: float
    low: float
    high: float
    doc: str


@dataclass(frozen=True)
class Rule:
    """A registered merging rule."""

    name: str
    function: RuleFunction
    doc: str
    linear: bool
    params: dict[str, Param] = field(default_factory=dict)

    def resolve(self, given: dict[str, float]) -> dict[str, float]:
        """Defaults filled in, unknown names and out-of-range values refused."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            allowed = ", ".join(sorted(self.params)) or "none"
            raise UsageError(f"rule {self.name!r} has no parameter {unknown[0]!r} (it takes: {allowed})")
        values = {name: float(given.get(name, spec.default)) for name, spec in self.params.items()}
        for name, value in values.items():
            spec = self.params[name]
            if not spec.low <= value <= spec.high:
                raise UsageError(f"rule {self.name}: {name}={value} is outside [{spec.low}, {spec.high}]")
        return values


RULES: dict[str, Rule] = {}

LAMBDA = Param(1.0, -1e6, 1e6, "scaling λ applied to the merged matrix")


def register(name: str, doc: str, linear: bool, **params: Param) -> Callable[[RuleFunction], RuleFunction]:
    """Decorator adding a rule function to the registry under `name`."""

    def add(function: RuleFunction) -> RuleFunction:
        RULES[name] = Rule(name=name, function=function, doc=doc, linear=linear, params=params)
        return function

    return add


def get_rule(name: str) -> Rule:
    """A rule by name, or a usage error listing the known ones."""
    if name not in RULES:
        raise UsageError(f"unknown rule {name!r}; choose one of: {', '.join(sorted(RULES))}")
    return RULES[name]


def weighted_sum(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t X_t over the task axis (-3)."""
    return (stack * weights.to(stack).view(-1, 1, 1)).sum(dim=-3)


@register("ta", "task arithmetic: λ · Σ w_t X_t", linear=True, **{"lambda": LAMBDA})
def task_arithmetic(
    stack: torch.Tensor, weights: torch.Tensor, params: dict[str, float], generator: torch.Generator | None
) -> torch.Tensor:
    """Task arithmetic: the weighted sum of the task matrices, scaled by λ."""
    return params["lambda"] * weighted_sum(stack, weights)


@register("mean", "weighted mean: Σ w_t X_t / Σ w_t", linear=True)
def weighted_mean(
    stack: torch.Tensor, weights: torch.Tensor, params: dict[str, float], generator: torch.Generator | None
) -> torch.Tensor:
    """Weighted average of the task matrices."""
    total = float(weights.sum())
    if total == 0:
        raise UsageError("rule mean: the weights sum to zero")
    return weighted_sum(stack, weights) / total
