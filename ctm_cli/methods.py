"""Registry of merge methods built on the core space and the rules; pure math, no I/O.

A method turns one group of modules (same shapes, stacked) into output LoRA factors plus the
per-module statistics the report needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ctm_cli import core_space as cs
from ctm_cli.errors import UsageError
from ctm_cli.rules import Rule


@dataclass(frozen=True)
class FactorGroup:
    """G modules of one shape: scaled B factors (G, out, R) and A factors (G, R, in) of T adapters."""

    b_cat: torch.Tensor
    a_cat: torch.Tensor
    ranks: list[int]


@dataclass(frozen=True)
class MergeSettings:
    """What to compute: output rank, rule and its parameters, task weights, CtM's β, randomness."""

    rank: int
    rule: Rule
    rule_params: dict[str, float]
    weights: torch.Tensor
    beta: float = 1.0
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class MergeResult:
    """Output factors of a group and what the report says about each module."""

    lora_b: torch.Tensor  # (G, out, r)
    lora_a: torch.Tensor  # (G, r, in)
    kept_energy: torch.Tensor  # (G, T): fraction of each adapter's update energy kept
    relative_error: torch.Tensor | None  # (G,): vs the full-rank result of the same rule
    sweeps: torch.Tensor | None  # (G,): HOOI sweeps
    frame_energy: torch.Tensor | None  # (G,): fraction of (balanced) energy the frame captures


MethodFunction = Callable[[FactorGroup, MergeSettings], MergeResult]


@dataclass(frozen=True)
class Method:
    """A registered merge method."""

    name: str
    function: MethodFunction
    doc: str
    needs_linear_rule: bool
    writes_total_rank: bool

    def output_rank(self, rank: int, total_rank: int) -> int:
        """Rank of the adapter this method writes for a requested rank and R = Σ r_t."""
        return total_rank if self.writes_total_rank else rank


METHODS: dict[str, Method] = {}


def register(
    name: str, doc: str, needs_linear_rule: bool = False, writes_total_rank: bool = False
) -> Callable[[MethodFunction], MethodFunction]:
    """Decorator adding a method function to the registry under `name`."""

    def add(function: MethodFunction) -> MethodFunction:
        METHODS[name] = Method(name, function, doc, needs_linear_rule, writes_total_rank)
        return function

    return add


def get_method(name: str) -> Method:
    """A method by name, or a usage error listing the known ones."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _relative_error(merged: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.matrix_norm(reference)
    return torch.linalg.matrix_norm(merged - reference) / norm.clamp_min(torch.finfo(norm.dtype).tiny)


def _energy_fraction(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    whole_energy = torch.linalg.matrix_norm(whole).square()
    kept = torch.linalg.matrix_norm(part).square()
    return torch.where(whole_energy > 0, kept / whole_energy.clamp_min(1e-300), torch.ones_like(kept))


@register("ctm", "Compress-then-Merge: shared rank-r frame by HOOI, rule on the r×r coordinates")
def compress_then_merge(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """CtM (DESIGN §1): core space, balanced HOOI frame, rule on r × r coordinates, rank-r output."""
    space = cs.core_space(group.b_cat, group.a_cat, group.ranks)
    frame = cs.shared_frame(cs.balance(space.cores, settings.beta), settings.rank)
    coordinates = cs.project(space.cores, frame.u, frame.v)
    rule = settings.rule
    merged = rule.function(coordinates, settings.weights, settings.rule_params, settings.generator)
    to_b, to_a = cs.balanced_factors(merged, space.left @ frame.u, space.right @ frame.v)
    dtype = group.b_cat.dtype
    relative_error = None
    if rule.linear:
        reference = rule.function(space.cores, settings.weights, settings.rule_params, settings.generator)
        relative_error = _relative_error(frame.u @ merged @ frame.v.mT, reference)
    return MergeResult(
        lora_b=group.b_cat @ to_b.to(dtype),
        lora_a=to_a.to(dtype) @ group.a_cat,
        kept_energy=_energy_fraction(coordinates, space.cores),
        relative_error=relative_error,
        sweeps=frame.sweeps,
        frame_energy=frame.energy / frame.total_energy.clamp_min(1e-300),
    )


@register(
    "cat",
    "concatenate the weighted factors: the exact result of a linear rule, rank R",
    needs_linear_rule=True,
    writes_total_rank=True,
)
def concatenate(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """Exact merge of a linear rule by stacking each adapter's factors with its rule coefficient."""
    total = sum(group.ranks)
    eye = torch.eye(total, dtype=torch.float64, device=group.b_cat.device)
    per_task = torch.stack([eye[:, cols] @ eye[:, cols].mT for cols in cs.column_slices(group.ranks)])
    coefficients = torch.diagonal(
        settings.rule.function(per_task, settings.weights, settings.rule_params, settings.generator)
    )
    g = group.b_cat.shape[0]
    return MergeResult(
        lora_b=group.b_cat * coefficients.to(group.b_cat),
        lora_a=group.a_cat.clone(),
        kept_energy=torch.ones(g, len(group.ranks), dtype=torch.float64, device=group.b_cat.device),
        relative_error=torch.zeros(g, dtype=torch.float64, device=group.b_cat.device),
        sweeps=None,
        frame_energy=None,
    )
