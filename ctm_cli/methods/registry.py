"""The registry of merge methods: what a method receives and returns, how it chooses its output rank, and the
settings it accepts (its parameters, a rule, β). Pure data and checks; the methods themselves live beside it.

A method turns one group of modules (same shapes, stacked) into output LoRA factors plus the
per-module statistics the report needs. Shapes: G modules, T adapters, R = Σ r_t, r the output rank.

What the report's figures mean, for every method:
- kept_energy[t]: share of adapter t's update ‖ΔW_t‖² inside the output's column and row spaces
  (ctm: inside its shared frame u, v, which are those spaces whenever the merged r × r matrix has
  full rank).
- relative_error: with a linear rule, ‖ΔW_out − Σ c_t ΔW_t‖ / ‖Σ c_t ΔW_t‖ against the exact
  full-rank merge of that rule. With a nonlinear rule only mtc has a full-rank reference at hand
  (the rule applied to the full updates, which it forms anyway), so it reports the truncation
  error against it; the others report None, as forming that reference would cost what they avoid.
- truncation_loss (ctm, mtc, core, knots): Σ_{i>r} σ_i² / Σ σ_i² of the merged matrix cut to rank r (for
  a spectral rule, of the weighted sum it cuts before remapping the spectrum).
- full_rank_loss (every method and rule): ‖ΔW_out − F‖² / ‖F‖², what the rank-r output loses against F, the
  same method and rule at full rank (ctm: the rule on the whole core space; a linear rule: the exact Σ c_t ΔW_t).
  It is relative_error² where that is known, the truncation loss where the output is a cut of F itself, and
  computed in core space otherwise (ctm in a HOOI frame, spectral rules, whose rank-r form remaps the kept values).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ctm_cli.errors import UsageError
from ctm_cli.module_spec import ModuleSpec
from ctm_cli.params import Param, Params
from ctm_cli.rules import Rule, linear_rule_names

P = TypeVar("P", bound=Params)


@dataclass(frozen=True)
class FactorGroup:
    """G modules of one shape: scaled B factors (G, out, R) and A factors (G, R, in) of T adapters."""

    b_cat: torch.Tensor
    a_cat: torch.Tensor
    ranks: list[int]


@dataclass(frozen=True)
class MergeSettings:
    """What to compute: the rank the group is written at, the rule and its parameters, task weights, CtM's β,
    randomness, and the method's parameters (None: the method's defaults)."""

    rank: int
    rule: Rule[Any]
    rule_params: Params
    weights: torch.Tensor
    beta: float = 1.0
    generator: torch.Generator | None = None
    method_params: Params | None = None

    def method_params_as(self, kind: type[P]) -> P:
        """The method's parameters, which a method registered with `kind` receives (its defaults if none given)."""
        if self.method_params is None:
            return kind()
        if not isinstance(self.method_params, kind):
            raise TypeError(f"expected {kind.__name__}, got {type(self.method_params).__name__}")
        return self.method_params


@dataclass(frozen=True)
class MergeResult:
    """Output factors of a group and what the report says about each module (see the module doc)."""

    lora_b: torch.Tensor  # (G, out, r)
    lora_a: torch.Tensor  # (G, r, in)
    kept_energy: torch.Tensor  # (G, T)
    relative_error: torch.Tensor | None  # (G,)
    sweeps: torch.Tensor | None = None  # (G,): HOOI sweeps (ctm)
    frame_energy: torch.Tensor | None = None  # (G,): share of (balanced) energy the frame captures (ctm)
    truncation_loss: torch.Tensor | None = None  # (G,): energy share dropped by the final cut (ctm, mtc, core, knots)
    full_rank_loss: torch.Tensor | None = None  # (G,): ‖ΔW_out − F‖² / ‖F‖², F the same rule's full-rank merge


MethodFunction = Callable[[FactorGroup, MergeSettings], MergeResult]
GroupsFunction = Callable[[list[FactorGroup], list[MergeSettings]], list[MergeResult]]


@dataclass(frozen=True)
class CoreMemory:
    """Float64 numbers of one module's core-space arrays at their peak: those `kept` while its whole wave merges
    (a method that merges the groups of a wave together, as ctm's batched HOOI) and those `working` only while its
    own group merges (groups are merged one after another); and how many float64 copies of the group's factors its
    steps hold at once (the core space's Gram step one, the report's kept energy or linear error another)."""

    kept: int
    working: int
    factor_copies: int = 2


# A module's CoreMemory from (each input's rank, the output rank, the rule, the method's parameters).
CoreNumbers = Callable[[tuple[int, ...], int, Rule[Any], Any], CoreMemory]


@dataclass(frozen=True)
class RankLimit:
    """The largest --rank a module of (R, out, in) allows with a given rule, and that bound as the catalog
    writes it."""

    text: str
    function: Callable[[int, int, int, Rule[Any]], int]


def _shape_limit(total_rank: int, out_features: int, in_features: int, rule: Rule[Any]) -> int:
    return min(total_rank, out_features, in_features)


SHAPE_LIMIT = RankLimit("min(R, out, in)", _shape_limit)


@dataclass(frozen=True)
class FixedRank:
    """An output rank the inputs' ranks decide, whatever --rank says, and its name in the catalog."""

    text: str
    of: Callable[[list[int]], int]


TOTAL_RANK = FixedRank("R", sum)
LARGEST_INPUT_RANK = FixedRank("max r_t", max)


def _three_core_stacks(ranks: tuple[int, ...], rank: int, rule: Rule[Any], params: Params) -> CoreMemory:
    return CoreMemory(kept=0, working=3 * len(ranks) * sum(ranks) ** 2)


@dataclass(frozen=True)
class Method:
    """A registered merge method and the settings it accepts.

    needs_linear_rule: the method is defined for a linear rule only.
    uses_beta: --beta (CtM's balancing) acts on it.
    fixed_rank: the inputs' ranks set the output rank (cat: R, robustmerge: max r_t) and --rank is ignored.
    zero_is_full: --rank 0 asks for no truncation, i.e. rank R (core, knots).
    rank_limit: the largest --rank a module allows with a given rule.
    parameters: the method's `Params` dataclass.
    default_rule: the rule used when none is given.
    merge_groups: merges several groups (of different shapes) together faster than one by one (ctm's
    batched HOOI); by default each group is merged on its own.
    core_numbers: float64 numbers of the core-space arrays one module holds at its peak (`CoreMemory`), from the
    inputs' ranks, the output rank, the rule and the method's parameters, for memory planning: three T × R × R
    stacks while its group merges by default.
    """

    name: str
    function: MethodFunction
    doc: str
    needs_linear_rule: bool = False
    uses_beta: bool = False
    fixed_rank: FixedRank | None = None
    zero_is_full: bool = False
    rank_limit: RankLimit = SHAPE_LIMIT
    parameters: type[Params] = Params
    default_rule: str = "ta"
    merge_groups: GroupsFunction | None = None
    core_numbers: CoreNumbers = _three_core_stacks

    @property
    def params(self) -> dict[str, Param]:
        """The method's parameters by name."""
        return self.parameters.specs()

    @property
    def rank_doc(self) -> str:
        """The output rank in words, from the rank fields: `R (--rank is ignored)`, `r, 1..min(R, out, in)`."""
        if self.fixed_rank is not None:
            return f"{self.fixed_rank.text} (--rank is ignored)"
        chosen = f"r, 1..{self.rank_limit.text}"
        return f"R with --rank 0 (no truncation); {chosen}" if self.zero_is_full else chosen

    def resolve(self, given: Mapping[str, float]) -> Params:
        """The method's parameters: `given` values over the defaults, ranges checked (other names ignored)."""
        return self.parameters.resolve(f"method {self.name}", given)

    def merge_all(self, groups: list[FactorGroup], settings: list[MergeSettings]) -> list[MergeResult]:
        """Merge several groups, each with its settings, together where the method can."""
        if self.merge_groups is not None:
            return self.merge_groups(groups, settings)
        return [self.function(group, each) for group, each in zip(groups, settings, strict=True)]

    def output_rank(self, rank: int, ranks: Sequence[int]) -> int:
        """Rank of the adapter this method writes for a requested rank and the inputs' ranks."""
        if self.fixed_rank is not None:
            return self.fixed_rank.of(list(ranks))
        if rank == 0 and self.zero_is_full:
            return sum(ranks)
        return rank

    def largest_rank(self, spec: ModuleSpec, rule: Rule[Any]) -> int:
        """The largest --rank this method can write for a module with a given rule."""
        return self.rank_limit.function(spec.total_rank, spec.out_features, spec.in_features, rule)

    def rank_caps(self, specs: list[ModuleSpec], rank: int, rule: Rule[Any]) -> dict[str, int]:
        """The modules that some inputs lack (rank 0 there) and that cannot hold the requested rank, with the largest
        rank each can hold: with --allow-missing they are written at that rank (a per-module rank) instead."""
        if self.fixed_rank is not None or (rank == 0 and self.zero_is_full):
            return {}
        return {
            spec.name: self.largest_rank(spec, rule)
            for spec in specs
            if 0 in spec.ranks and 1 <= self.largest_rank(spec, rule) < rank
        }

    def check_rank(self, specs: list[ModuleSpec], rank: int, rule: Rule[Any]) -> None:
        """Refuse a requested rank this method cannot write for some module, naming the allowed range.

        A fixed-rank method (cat, robustmerge) ignores --rank; core and knots take 0 for "no truncation" (rank
        R); otherwise 1 ≤ rank ≤ the method's limit for every module."""
        if self.fixed_rank is not None or (rank == 0 and self.zero_is_full):
            return
        full = " (or 0 for the full rank R)" if self.zero_is_full else ""
        if rank < 1:
            raise UsageError(f"--rank must be a positive integer for method {self.name}{full}, got {rank}")

        def limit(spec: ModuleSpec) -> int:
            return self.largest_rank(spec, rule)

        tightest = min(specs, key=limit)
        if rank > limit(tightest):
            raise UsageError(
                f"--rank {rank} is larger than possible for method {self.name}: module {tightest.name} allows at "
                f"most {limit(tightest)} (R={tightest.total_rank}, out={tightest.out_features}, "
                f"in={tightest.in_features}); choose 1..{limit(tightest)}{full}"
            )


METHODS: dict[str, Method] = {}


def register(name: str, doc: str, **options: Any) -> Callable[[MethodFunction], MethodFunction]:
    """Decorator adding a method function to the registry under `name` (options: Method's fields)."""

    def add(function: MethodFunction) -> MethodFunction:
        METHODS[name] = Method(name, function, doc, **options)
        return function

    return add


def get_method(name: str) -> Method:
    """A method by name, or a usage error listing the known ones."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def resolve_settings(method: Method, rule: Rule[Any], given: Mapping[str, float]) -> tuple[Params, Params]:
    """Split `--param` values between the method and the rule, fill defaults, check names and ranges."""
    if method.needs_linear_rule and not rule.linear:
        raise UsageError(
            f"method {method.name} needs a linear rule ({', '.join(linear_rule_names())}); {rule.name} is not"
        )
    unknown = sorted(set(given) - set(method.params) - set(rule.params))
    if unknown:
        accepted = ", ".join(sorted({*method.params, *rule.params})) or "none"
        raise UsageError(
            f"{unknown[0]!r} is not a parameter of method {method.name} or rule {rule.name} (they take: {accepted})"
        )
    method_params = method.resolve(given)
    rule_params = rule.resolve({k: v for k, v in given.items() if k in rule.params})
    return method_params, rule_params
