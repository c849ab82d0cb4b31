"""Registry of merging rules: pure functions on a stack of same-shaped matrices; no I/O.

A rule takes `stack` (..., T, m, n), `weights` (T,), its parameters (a `Params` dataclass of its own) and a
torch.Generator, and returns the merged (..., m, n) matrix. The same rule runs on r × r coordinates (ctm),
R × R cores (core), the per-task right factors of KnOTS or full out × in updates (mtc). Randomness (dare) is
drawn only from the generator, on the CPU, and then moved to the stack's device, so a seed gives the same
draws on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import torch

from ctm_cli import small_linalg
from ctm_cli.core_space import FactoredCores, SvdForm, numerical_rank_mask
from ctm_cli.errors import UsageError
from ctm_cli.fixed_order import matmul
from ctm_cli.params import Param, Params, param

P = TypeVar("P", bound=Params)
# (The torch types are quoted, as only annotations are: `ctm methods` reads the registry without loading torch.)
RuleFunction = Callable[["torch.Tensor", "torch.Tensor", P, "torch.Generator | None"], "torch.Tensor"]
# Of a spectral rule: (singular values (..., k) in decreasing order, parameters, max(m, n)) -> new values.
SpectrumMap = Callable[["torch.Tensor", P, int], "torch.Tensor"]
# Of a rule with a factored form: (cores, weights, parameters) -> the merged R × R matrix in SVD form.
FactoredRule = Callable[["FactoredCores", "torch.Tensor", P], "SvdForm"]


class RuleError(ValueError):
    """Inputs a rule cannot merge (the weights of a mean summing to zero): a math error, which the engine reports
    to the user."""


@dataclass(frozen=True)
class Rule(Generic[P]):
    """A registered merging rule.

    `linear`: the result is Σ_t c_t X_t for coefficients c_t that do not depend on the matrices, so
    it commutes with any change of basis (and with truncation-free concatenation).
    `spectrum` (spectral rules): the result is U · spectrum(S) · Vᵀ for the SVD U S Vᵀ of Σ w_t X_t, so
    it commutes with orthonormal changes of basis (it runs exactly in core space), and its rank-k form
    is the map applied to the top k triplets of the sum.
    `parameters`: the rule's `Params` dataclass.
    `factored` (optional): the same rule on the cores of a core space given by their factors (FactoredCores), with
    its result in SVD form: a faster route to the same result that never forms the T dense cores.
    `equivariant`: neither linear nor spectral, the rule still commutes with orthonormal changes of basis (TSV:
    SVDs and polar factors rotate with the basis); see `basis_free`.
    """

    name: str
    function: RuleFunction[P]
    doc: str
    linear: bool
    parameters: type[P]
    spectrum: SpectrumMap[P] | None = None
    factored: FactoredRule[P] | None = None
    equivariant: bool = False

    @property
    def basis_free(self) -> bool:
        """Whether the rule commutes with orthonormal changes of basis, so that a core space in any orthonormal
        basis gives the same merge (a rule acting entry by entry sees the basis)."""
        return self.linear or self.spectral or self.equivariant

    @property
    def spectral(self) -> bool:
        """Whether the rule only remaps the singular values of the weighted sum."""
        return self.spectrum is not None

    @property
    def params(self) -> dict[str, Param]:
        """The rule's parameters by name."""
        return self.parameters.specs()

    def resolve(self, given: Mapping[str, float]) -> P:
        """The rule's parameters: `given` over the defaults, unknown names and out-of-range values refused."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            allowed = ", ".join(sorted(self.params)) or "none"
            raise UsageError(f"rule {self.name!r} has no parameter {unknown[0]!r} (it takes: {allowed})")
        return self.parameters.resolve(f"rule {self.name}", given)


RULES: dict[str, Rule[Any]] = {}

# How many of a matrix's d entries a trim to density ρ keeps (the values of `trim_count`).
TRIM_NEAREST, TRIM_REFERENCE, TRIM_PEFT = 0, 1, 2


def _scale() -> Any:
    return param(1.0, -1e6, 1e6, "scaling λ applied to the merged matrix")


def _density(default: float = 0.2, doc: str = "fraction of entries kept by magnitude") -> Any:
    return param(default, 0.0, 1.0, doc, open_low=True)


def _trim_count() -> Any:
    return param(
        TRIM_NEAREST,
        TRIM_NEAREST,
        TRIM_PEFT,
        "entries a trim keeps of d: 0 = round(ρ·d), at least 1; 1 = ⌊ρ·d⌋+1 (the TIES and CtM papers' code); "
        "2 = ⌊ρ·d⌋ (PEFT)",
    )


def _sign_count() -> Any:
    return param(0, 0, 1, "sign election: 0 = by total mass (TIES), 1 = by count (even split: by mass)")


def _drop_rate() -> Any:
    return param(0.9, 0.0, 1.0, "probability p of dropping an entry (kept ones are scaled by 1/(1-p))", open_high=True)


@dataclass(frozen=True)
class Scaled(Params):
    """λ alone (ta, tsv, iso_c)."""

    lambda_: float = _scale()


@dataclass(frozen=True)
class TiesParams(Params):
    """TIES: the trim's density and count, the sign election, λ."""

    density: float = _density()
    trim_count: int = _trim_count()
    sign_count: int = _sign_count()
    lambda_: float = _scale()


@dataclass(frozen=True)
class DareParams(Params):
    """DARE then task arithmetic: the drop rate, λ."""

    drop_rate: float = _drop_rate()
    lambda_: float = _scale()


@dataclass(frozen=True)
class DareTiesParams(Params):
    """DARE then TIES: the drop rate, the trim (none by default), the sign election, λ."""

    drop_rate: float = _drop_rate()
    density: float = _density(1.0, "fraction kept by the TIES trim after the drop (1 = no trim)")
    trim_count: int = _trim_count()
    sign_count: int = _sign_count()
    lambda_: float = _scale()


@dataclass(frozen=True)
class PruneParams(Params):
    """Magnitude pruning of the sum: its density and count, λ."""

    density: float = _density()
    trim_count: int = _trim_count()
    lambda_: float = _scale()


def register(
    name: str,
    doc: str,
    linear: bool,
    parameters: type[P],
    spectrum: SpectrumMap[P] | None = None,
    factored: FactoredRule[P] | None = None,
    equivariant: bool = False,
) -> Callable[[RuleFunction[P]], RuleFunction[P]]:
    """Decorator adding a rule function to the registry under `name`, with its parameters' dataclass."""

    def add(function: RuleFunction[P]) -> RuleFunction[P]:
        RULES[name] = Rule(name, function, doc, linear, parameters, spectrum, factored, equivariant)
        return function

    return add


def get_rule(name: str) -> Rule[Any]:
    """A rule by name, or a usage error listing the known ones."""
    if name not in RULES:
        raise UsageError(f"unknown rule {name!r}; choose one of: {', '.join(sorted(RULES))}")
    return RULES[name]


def linear_rule_names() -> list[str]:
    """Names of the linear rules, for messages."""
    return sorted(name for name, rule in RULES.items() if rule.linear)


def linear_coefficients(
    rule: Rule[P], weights: torch.Tensor, params: P, generator: torch.Generator | None
) -> torch.Tensor:
    """The c_t of a linear rule (result = Σ c_t X_t), read off by applying it to one-hot 1 × 1 stacks."""
    tasks = weights.shape[0]
    one_hot = torch.eye(tasks, dtype=torch.float64, device=weights.device).view(tasks, tasks, 1, 1)
    return rule.function(one_hot, weights, params, generator).view(tasks)


def _task_weights(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return weights.to(stack).view(-1, 1, 1)


def weighted_sum(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t X_t over the task axis (-3)."""
    return (stack * _task_weights(stack, weights)).sum(dim=-3)


def kept_count(size: int, density: float, trim_count: int = TRIM_NEAREST) -> int:
    """How many of `size` entries a density keeps (at most `size`), by the counting rule `trim_count`.

    TRIM_NEAREST: the nearest whole number, at least 1. TRIM_REFERENCE: ⌊ρ·d⌋+1, what the TIES and CtM
    reference code keeps (the mask |x| ≥ the (d−⌊ρ·d⌋)-th smallest magnitude). TRIM_PEFT: ⌊ρ·d⌋, PEFT's
    top-k, which keeps nothing when ρ·d < 1.
    """
    if trim_count == TRIM_REFERENCE:
        return min(size, math.floor(density * size) + 1)
    if trim_count == TRIM_PEFT:
        return min(size, math.floor(density * size))
    return min(size, max(1, math.floor(density * size + 0.5)))


def top_fraction_mask(matrices: torch.Tensor, density: float, trim_count: int = TRIM_NEAREST) -> torch.Tensor:
    """Boolean mask of each (m, n) matrix's `kept_count(m·n, density, trim_count)` largest-magnitude entries.

    Entries tied with the smallest kept magnitude are all kept (as the TIES code does; PEFT's top-k keeps
    exactly k); an empty matrix (a rank-0 input), or a count of 0, keeps nothing.
    """
    magnitudes = matrices.abs().flatten(-2)
    size = magnitudes.shape[-1]
    count = kept_count(size, density, trim_count) if size else 0
    if count == 0:
        return torch.zeros_like(matrices, dtype=torch.bool)
    threshold = magnitudes.kthvalue(size - count + 1, dim=-1, keepdim=True).values
    return (magnitudes >= threshold).view(matrices.shape)


def _disjoint_mean(stack: torch.Tensor, by_count: bool) -> torch.Tensor:
    """TIES' sign election and disjoint mean over the task axis of an already trimmed, weighted stack."""
    signs = stack.sign()
    mass = stack.sum(dim=-3)
    votes = torch.where(signs.sum(dim=-3) != 0, signs.sum(dim=-3), mass.sign()) if by_count else mass
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stack).unsqueeze(-3)
    agrees = signs == elected
    count = agrees.sum(dim=-3).clamp_min(1)
    return (stack * agrees).sum(dim=-3) / count


def _ties(stack: torch.Tensor, weights: torch.Tensor, params: TiesParams | DareTiesParams) -> torch.Tensor:
    """TIES on the weighted stack with the rule's density, trim_count and sign_count (λ not applied)."""
    weighted = stack * _task_weights(stack, weights)
    density = params.density
    trimmed = weighted * top_fraction_mask(weighted, density, params.trim_count) if density < 1 else weighted
    return _disjoint_mean(trimmed, params.sign_count == 1)


def _drop_and_rescale(stack: torch.Tensor, drop_rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: zero each entry with probability p, scale the rest by 1/(1-p); u ~ U[0,1) float32 on the CPU."""
    uniform = torch.rand(stack.shape, generator=generator, dtype=torch.float32, device="cpu")
    keep = (uniform >= drop_rate).to(stack.device)
    return stack * keep / (1.0 - drop_rate)


@register("ta", "task arithmetic: λ · Σ w_t X_t", linear=True, parameters=Scaled)
def task_arithmetic(
    stack: torch.Tensor, weights: torch.Tensor, params: Scaled, generator: torch.Generator | None
) -> torch.Tensor:
    """Task arithmetic: the weighted sum of the task matrices, scaled by λ."""
    return params.lambda_ * weighted_sum(stack, weights)


@register("mean", "weighted mean: Σ w_t X_t / Σ w_t", linear=True, parameters=Params)
def weighted_mean(
    stack: torch.Tensor, weights: torch.Tensor, params: Params, generator: torch.Generator | None
) -> torch.Tensor:
    """Weighted average of the task matrices."""
    total = float(weights.sum())
    if total == 0:
        raise RuleError("rule mean: the weights sum to zero")
    return weighted_sum(stack, weights) / total


@register(
    "ties",
    "TIES: keep each w_t X_t's top entries by magnitude, elect a sign per entry, average the agreeing ones; × λ",
    linear=False,
    parameters=TiesParams,
)
def ties(
    stack: torch.Tensor, weights: torch.Tensor, params: TiesParams, generator: torch.Generator | None
) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023) on the weighted matrices w_t X_t.

    Trim: keep each matrix's `density` fraction of entries by magnitude, counted as `trim_count` says
    (kept_count: 0 = nearest, ctm's default; 1 = ⌊ρ·d⌋+1 as the TIES and CtM papers' code; 2 = ⌊ρ·d⌋ as
    PEFT). Elect: per entry the sign of the summed kept values (sign_count=0) or of the summed signs (1;
    an even split is decided by the summed values); an exact zero goes to +. Breaking even splits by mass
    rather than always to + keeps the rule equivariant to sign flips of the basis, which SVD-based frames
    leave arbitrary.
    Disjoint mean: the mean of the kept values with the elected sign (zero where none). Times λ.
    """
    return params.lambda_ * _ties(stack, weights, params)


@register(
    "dare",
    "DARE: drop entries with probability p, rescale by 1/(1-p), then task arithmetic λ · Σ w_t X_t",
    linear=False,
    parameters=DareParams,
)
def dare(
    stack: torch.Tensor, weights: torch.Tensor, params: DareParams, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE (Yu et al. 2024) then task arithmetic; the drop mask comes from the seeded generator."""
    return params.lambda_ * weighted_sum(_drop_and_rescale(stack, params.drop_rate, generator), weights)


@register(
    "dare_ties",
    "DARE then TIES: random drop and rescale, optional magnitude trim (density), sign election, disjoint mean; × λ",
    linear=False,
    parameters=DareTiesParams,
)
def dare_ties(
    stack: torch.Tensor, weights: torch.Tensor, params: DareTiesParams, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE's random drop and rescale, then TIES (trim by `density`, 1 = none as in PEFT and MergeKit; counted
    as `trim_count` says)."""
    dropped = _drop_and_rescale(stack, params.drop_rate, generator)
    return params.lambda_ * _ties(dropped, weights, params)


def _tsv_factored(cores: FactoredCores, weights: torch.Tensor, params: Scaled) -> SvdForm:
    """TSV of the cores C_t (R × R), as `task_singular_vectors` on cores.dense(), from their factors: each task's
    SVD by QR of its R × r_t factors (no R × R SVD per task), and the result left in SVD form (the cut to rank r
    takes its top singular values, no SVD of the result)."""
    weighted = replace(cores, scales=cores.scales * weights.to(cores.scales))
    return _orthogonalised_triplets(weighted.task_svds(), cores.b.shape[-1], params.lambda_)


def _orthogonalised_triplets(tasks: SvdForm, size: int, scale: float) -> SvdForm:
    """TSV's step after the tasks' SVDs (U_t, σ_t, V_t: (..., T, m or n, ≥ k), σ decreasing; `size` = max(m, n)):
    each task's top k = max(1, ⌊min(m, n)/T⌋) triplets (numerically zero ones left out), the U's and V's
    concatenated and replaced by their polar factors; the result is U⊥ · diag(scale · σ) · V⊥ᵀ, in SVD form."""
    count, m, n = tasks.u.shape[-3], tasks.u.shape[-2], tasks.v.shape[-2]
    keep = max(1, min(m, n) // count)
    u, s, v = tasks.u[..., :keep], tasks.s[..., :keep], tasks.v[..., :keep]
    s = s * numerical_rank_mask(s, size)
    present = (s > 0).to(s.dtype).unsqueeze(-2)
    u_cat = (u * present).transpose(-3, -2).reshape(*u.shape[:-3], m, count * keep)
    v_cat = (v * present).transpose(-3, -2).reshape(*v.shape[:-3], n, count * keep)
    sigma = s.reshape(*s.shape[:-2], count * keep)
    return SvdForm(small_linalg.polar(u_cat), scale * sigma, small_linalg.polar(v_cat))


@register(
    "tsv",
    "task singular vectors: each w_t X_t's top 1/T singular triplets, U's and V's orthogonalised, summed; × λ",
    linear=False,
    parameters=Scaled,
    factored=_tsv_factored,
    equivariant=True,
)
def task_singular_vectors(
    stack: torch.Tensor, weights: torch.Tensor, params: Scaled, generator: torch.Generator | None
) -> torch.Tensor:
    """TSV-Merge (Gargiulo et al. 2025).

    Each task keeps its top k = max(1, ⌊min(m, n)/T⌋) singular triplets of w_t X_t (triplets with a
    numerically zero singular value are left out, as their vectors are arbitrary). The kept U's and
    V's are concatenated and each replaced by its polar factor (U → PQᵀ from U = PΣQᵀ); the result is
    U⊥ · diag(σ) · V⊥ᵀ, times λ.
    """
    u, s, vh = small_linalg.svd(stack * _task_weights(stack, weights))
    merged = _orthogonalised_triplets(SvdForm(u, s, vh.mT), max(stack.shape[-2:]), params.lambda_)
    return matmul(merged.u * merged.s.unsqueeze(-2), merged.v.mT)


def isotropic_spectrum(singular_values: torch.Tensor, scale: float, size: int) -> torch.Tensor:
    """Iso-C's spectrum: the numerically nonzero singular values replaced by their mean, times `scale`."""
    present = numerical_rank_mask(singular_values, size).to(singular_values.dtype)
    mean = (singular_values * present).sum(dim=-1, keepdim=True) / present.sum(dim=-1, keepdim=True).clamp_min(1)
    return scale * mean * present


def _iso_c_spectrum(singular_values: torch.Tensor, params: Scaled, size: int) -> torch.Tensor:
    """Iso-C's spectrum at the rule's λ."""
    return isotropic_spectrum(singular_values, params.lambda_, size)


@register(
    "iso_c",
    "Iso-C: SVD of Σ w_t X_t with its nonzero singular values replaced by their mean; × λ",
    linear=False,
    parameters=Scaled,
    spectrum=_iso_c_spectrum,
)
def isotropic_common(
    stack: torch.Tensor, weights: torch.Tensor, params: Scaled, generator: torch.Generator | None
) -> torch.Tensor:
    """Iso-C (Marczak et al. 2025): flatten the spectrum of the sum over its numerical rank."""
    total = weighted_sum(stack, weights)
    u, s, vh = small_linalg.svd(total)
    return matmul(u * _iso_c_spectrum(s, params, max(total.shape[-2:])).unsqueeze(-2), vh)


@register(
    "magnitude_prune",
    "magnitude pruning: keep the top entries of Σ w_t X_t by magnitude (density); × λ",
    linear=False,
    parameters=PruneParams,
)
def magnitude_prune(
    stack: torch.Tensor, weights: torch.Tensor, params: PruneParams, generator: torch.Generator | None
) -> torch.Tensor:
    """The weighted sum with all but its `density` fraction of largest-magnitude entries (counted as
    `trim_count` says) zeroed, times λ."""
    total = weighted_sum(stack, weights)
    return params.lambda_ * total * top_fraction_mask(total, params.density, params.trim_count)
