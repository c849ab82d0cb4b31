"""Registry of merge methods built on the core space and the rules; pure math, no I/O.

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
- truncation_loss (mtc, core, knots): Σ_{i>r} σ_i² / Σ σ_i² of the merged matrix cut to rank r (for
  a spectral rule, of the weighted sum it cuts before remapping the spectrum).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from ctm_cli import core_space as cs
from ctm_cli.errors import UsageError
from ctm_cli.rules import (
    Param,
    Rule,
    linear_coefficients,
    linear_rule_names,
    resolve_params,
    top_fraction_mask,
    weighted_sum,
)

KMEANS_MAX_ITERATIONS = 100


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
    method_params: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeResult:
    """Output factors of a group and what the report says about each module (see the module doc)."""

    lora_b: torch.Tensor  # (G, out, r)
    lora_a: torch.Tensor  # (G, r, in)
    kept_energy: torch.Tensor  # (G, T)
    relative_error: torch.Tensor | None  # (G,)
    sweeps: torch.Tensor | None = None  # (G,): HOOI sweeps (ctm)
    frame_energy: torch.Tensor | None = None  # (G,): share of (balanced) energy the frame captures (ctm)
    truncation_loss: torch.Tensor | None = None  # (G,): energy share dropped by the final cut (mtc, core, knots)


MethodFunction = Callable[[FactorGroup, MergeSettings], MergeResult]
GroupsFunction = Callable[[list[FactorGroup], list[MergeSettings]], list[MergeResult]]
RankLimit = Callable[[int, int, int, Rule], int]


def shape_rank_limit(total_rank: int, out_features: int, in_features: int, rule: Rule) -> int:
    """The usual largest output rank: min(R, out, in)."""
    return min(total_rank, out_features, in_features)


@dataclass(frozen=True)
class Method:
    """A registered merge method and how it chooses its output rank.

    natural_rank: the rank is set by the inputs (cat: R, robustmerge: max r_t) and --rank is ignored.
    zero_is_full: --rank 0 asks for no truncation, i.e. rank R (core, knots).
    rank_limit: the largest --rank a module of (R, out, in) allows with a given rule.
    default_rule: the rule used when none is given.
    merge_groups: merges several groups (of different shapes) together faster than one by one (ctm's
    batched HOOI); by default each group is merged on its own.
    factored_cores: the method keeps the T cores as two R × R factors, not T·R² numbers (memory planning).
    """

    name: str
    function: MethodFunction
    doc: str
    rank_doc: str
    needs_linear_rule: bool = False
    natural_rank: Callable[[list[int]], int] | None = None
    zero_is_full: bool = False
    rank_limit: RankLimit = shape_rank_limit
    params: dict[str, Param] = field(default_factory=dict)
    default_rule: str = "ta"
    merge_groups: GroupsFunction | None = None
    factored_cores: bool = False

    def merge_all(self, groups: list[FactorGroup], settings: list[MergeSettings]) -> list[MergeResult]:
        """Merge several groups, each with its settings, together where the method can."""
        if self.merge_groups is not None:
            return self.merge_groups(groups, settings)
        return [self.function(group, each) for group, each in zip(groups, settings, strict=True)]

    def output_rank(self, rank: int, ranks: list[int]) -> int:
        """Rank of the adapter this method writes for a requested rank and the inputs' ranks."""
        if self.natural_rank is not None:
            return self.natural_rank(list(ranks))
        if rank == 0 and self.zero_is_full:
            return sum(ranks)
        return rank


METHODS: dict[str, Method] = {}


def register(name: str, doc: str, rank_doc: str, **options) -> Callable[[MethodFunction], MethodFunction]:
    """Decorator adding a method function to the registry under `name` (options: Method's fields)."""

    def add(function: MethodFunction) -> MethodFunction:
        METHODS[name] = Method(name, function, doc, rank_doc, **options)
        return function

    return add


def get_method(name: str) -> Method:
    """A method by name, or a usage error listing the known ones."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def resolve_settings(method: Method, rule: Rule, given: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
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
    method_params = resolve_params(f"method {method.name}", method.params, given)
    rule_params = rule.resolve({k: v for k, v in given.items() if k in rule.params})
    return method_params, rule_params


def _column_coefficients(group: FactorGroup, settings: MergeSettings) -> torch.Tensor:
    """A linear rule's c_t repeated over each task's columns of the concatenated factors (R,)."""
    coefficients = linear_coefficients(settings.rule, settings.weights, settings.rule_params, settings.generator)
    counts = torch.tensor(group.ranks, device=coefficients.device)
    return torch.repeat_interleave(coefficients, counts)


def _result(
    group: FactorGroup,
    settings: MergeSettings,
    lora_b: torch.Tensor,
    lora_a: torch.Tensor,
    **figures: torch.Tensor | None,
) -> MergeResult:
    """A MergeResult with the default figures (module doc) unless given in `figures`."""
    if "kept_energy" not in figures:
        figures["kept_energy"] = cs.energy_in_output_spaces(lora_b, lora_a, group.b_cat, group.a_cat, group.ranks)
    if "relative_error" not in figures:
        figures["relative_error"] = None
        if settings.rule.linear:
            scaled = group.b_cat.to(torch.float64) * _column_coefficients(group, settings).to(group.b_cat.device)
            figures["relative_error"] = cs.lowrank_relative_error(lora_b, lora_a, scaled, group.a_cat)
    return MergeResult(lora_b=lora_b, lora_a=lora_a, **figures)


def _from_core_maps(group: FactorGroup, to_b: torch.Tensor, to_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_B = b_cat @ to_b, lora_A = to_a @ a_cat, in the factors' dtype."""
    dtype = group.b_cat.dtype
    return group.b_cat @ to_b.to(dtype), to_a.to(dtype) @ group.a_cat


def _apply_rule(stack: torch.Tensor, settings: MergeSettings) -> torch.Tensor:
    return settings.rule.function(stack, settings.weights, settings.rule_params, settings.generator)


def _merge_and_cut(
    stack: torch.Tensor,
    settings: MergeSettings,
    left_map: torch.Tensor | None = None,
    right_map: torch.Tensor | None = None,
) -> cs.Truncation:
    """The rule's result cut to settings.rank by SVD.

    A spectral rule (iso_c) flattens the spectrum, and a flat spectrum has no best rank-r part, so
    for it the weighted sum is cut first and its top r singular values are remapped: the rule's
    rank-r form. Its lost_energy is then that of the weighted sum.
    """
    rule = settings.rule
    if not rule.spectral:
        return cs.truncate(_apply_rule(stack, settings), settings.rank, left_map, right_map)
    total = weighted_sum(stack, settings.weights)
    size = max(total.shape[-2:])
    spectrum = partial(rule.spectrum, params=settings.rule_params, size=size)
    return cs.truncate(total, settings.rank, left_map, right_map, spectrum=spectrum)


# ---------------------------------------------------------------------------------------------- ctm


def compress_then_merge_groups(groups: list[FactorGroup], settings: list[MergeSettings]) -> list[MergeResult]:
    """CtM (DESIGN §1) of several groups: core space, balanced HOOI frame, rule on r × r coordinates, rank-r
    output. The frames of all groups come from one batched HOOI (`cs.shared_frames_factored`), so groups of
    other shapes cost no extra sweeps. The T cores stay factored (two R × R factors instead of T·R² numbers),
    so memory does not grow with T²."""
    spaces = [cs.factored_core_space(group.b_cat, group.a_cat, group.ranks) for group in groups]
    balanced = [cs.balance_factored(space.cores, each.beta) for space, each in zip(spaces, settings, strict=True)]
    stopping = settings[0].method_params  # one merge's groups share everything but the rank
    frames = cs.shared_frames_factored(
        balanced,
        [each.rank for each in settings],
        tolerance=stopping.get("hooi_tolerance", cs.HOOI_TOLERANCE),
        max_sweeps=int(stopping.get("max_sweeps", cs.HOOI_MAX_SWEEPS)),
    )
    return [_ctm_output(*arguments) for arguments in zip(groups, settings, spaces, frames, strict=True)]


def _ctm_output(
    group: FactorGroup, settings: MergeSettings, space: cs.FactoredCoreSpace, frame: cs.SharedFrame
) -> MergeResult:
    """CtM's output for one group once its frame is known: the rule on the coordinates, cut to rank r."""
    coordinates = space.cores.project(frame.u, frame.v)
    merged = _apply_rule(coordinates, settings)
    cut = cs.truncate(merged, settings.rank, space.left @ frame.u, space.right @ frame.v)
    lora_b, lora_a = _from_core_maps(group, cut.to_b, cut.to_a)
    whole = space.cores.norms()
    kept = torch.linalg.matrix_norm(coordinates).square() / whole.square().clamp_min(1e-300)
    return _result(
        group,
        settings,
        lora_b,
        lora_a,
        kept_energy=torch.where(whole > 0, kept, torch.ones_like(kept)),
        sweeps=frame.sweeps,
        frame_energy=frame.energy / frame.total_energy.clamp_min(1e-300),
    )


@register(
    "ctm",
    "Compress-then-Merge: shared rank-r frame by HOOI, rule on the r×r coordinates (default rule: iso_c)",
    "r, 1..min(R, out, in)",
    # Iso-C on the shared frame's coordinates, at λ 1 with no tuning, kept the most of each task's gain on the
    # quality benchmark (docs/benchmarks.md: 3 seeds, ahead of TIES tuned); with a linear rule CtM equals
    # merge-then-compress.
    default_rule="iso_c",
    merge_groups=compress_then_merge_groups,
    factored_cores=True,
    params={
        "hooi_tolerance": Param(
            cs.HOOI_TOLERANCE,
            0.0,
            1.0,
            "HOOI stops once a sweep raises the captured energy and moves the subspaces by less than this",
            open_low=True,
        ),
        "max_sweeps": Param(cs.HOOI_MAX_SWEEPS, 1, 100_000, "most HOOI sweeps per module", integer=True),
    },
)
def compress_then_merge(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """CtM of one group (see compress_then_merge_groups)."""
    return compress_then_merge_groups([group], [settings])[0]


# ---------------------------------------------------------------------------------------------- mtc


def _mtc_rank_limit(total_rank: int, out_features: int, in_features: int, rule: Rule) -> int:
    """A linear or spectral merge has rank ≤ R; an element-wise one can reach min(out, in)."""
    if rule.linear or rule.spectral:
        return min(total_rank, out_features, in_features)
    return min(out_features, in_features)


def full_updates(b: torch.Tensor, a: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """Every task's full update B_t A_t of one module, stacked (T, out, in)."""
    return torch.stack([b[:, cols] @ a[cols, :] for cols in cs.column_slices(ranks)])


@register(
    "mtc",
    "Merge-then-Compress: rule on the full updates (exactly in core space when linear/spectral), truncated SVD",
    "r, 1..min(R, out, in) (element-wise rules: 1..min(out, in))",
    rank_limit=_mtc_rank_limit,
)
def merge_then_compress(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """Merge the full updates with the rule, then keep the best rank-r approximation.

    Linear and spectral rules commute with the orthonormal core bases, so they run on the R × R
    cores and the SVD of the merged core gives exactly the full-space result. Element-wise rules are
    defined on the full out × in matrices: those are formed one module at a time on the device.
    """
    rule = settings.rule
    if rule.linear or rule.spectral:
        space = cs.core_space(group.b_cat, group.a_cat, group.ranks)
        cut = _merge_and_cut(space.cores, settings, space.left, space.right)
        lora_b, lora_a = _from_core_maps(group, cut.to_b, cut.to_a)
        loss = cut.lost_energy
    else:
        cuts = [
            cs.truncate(_apply_rule(full_updates(b, a, group.ranks), settings), settings.rank)
            for b, a in zip(group.b_cat, group.a_cat, strict=True)
        ]
        lora_b = torch.stack([cut.to_b for cut in cuts])
        lora_a = torch.stack([cut.to_a for cut in cuts])
        loss = torch.stack([cut.lost_energy for cut in cuts]).to(torch.float64)
    error = loss.sqrt()
    if rule.spectral:  # the reference is the full-rank rule, not the weighted sum that was cut
        full = _apply_rule(space.cores, settings)
        error = cs.lowrank_relative_error(
            lora_b,
            lora_a,
            group.b_cat.to(torch.float64) @ (space.left @ full),
            space.right.mT @ group.a_cat.to(torch.float64),
        )
    return _result(group, settings, lora_b, lora_a, relative_error=error, truncation_loss=loss)


# ---------------------------------------------------------------------------------------------- core


@register(
    "core",
    "Core Space merging: rule on the R×R cores, output Q_B·rule(C)·Q_Aᵀ",
    "R with --rank 0 (no truncation); r, 1..min(R, out, in), truncates by SVD of the merged core",
    zero_is_full=True,
)
def core_space_merge(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """Core Space merging (Panariello et al. 2025): the rule on the cores, optionally cut to rank r."""
    space = cs.core_space(group.b_cat, group.a_cat, group.ranks)
    cut = _merge_and_cut(space.cores, settings, space.left, space.right)
    lora_b, lora_a = _from_core_maps(group, cut.to_b, cut.to_a)
    return _result(group, settings, lora_b, lora_a, truncation_loss=cut.lost_energy)


# ---------------------------------------------------------------------------------------------- knots


@register(
    "knots",
    "KnOTS: SVD of the concatenated updates [ΔW_1 … ΔW_T] = U S [V_1 … V_T]ᵀ, rule on the S·V_tᵀ, output U·merged",
    "R with --rank 0 (no truncation); r, 1..min(R, out, in), truncates by SVD",
    zero_is_full=True,
)
def knots(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """KnOTS (Stoica et al. 2025), with its SVD taken in core space.

    [C_1 … C_T] = U S [V_1 … V_T]ᵀ (R × T·R) gives [ΔW_1 … ΔW_T] = (Q_B U) S [Q_A V_1 … Q_A V_T]ᵀ, so
    the task-specific right factors are X_t = S V_tᵀ Q_Aᵀ (R × in), as in the paper. The rule merges
    them (in float64); the output Q_B U · rule(X) is cut to rank r by the SVD of rule(X) (R × in).
    """
    space = cs.core_space(group.b_cat, group.a_cat, group.ranks)
    modules, tasks, total, _ = space.cores.shape
    concatenated = space.cores.transpose(-3, -2).reshape(modules, total, tasks * total)
    u, s, vh = torch.linalg.svd(concatenated, full_matrices=False)
    blocks = vh.reshape(modules, total, tasks, total).transpose(-3, -2)  # (G, T, R, R): V_tᵀ in core coordinates
    to_inputs = (s[:, None, :, None] * blocks) @ space.right.mT.unsqueeze(-3)
    right_factors = to_inputs @ group.a_cat.to(torch.float64).unsqueeze(-3)
    cut = _merge_and_cut(right_factors, settings, left_map=space.left @ u)
    dtype = group.b_cat.dtype
    lora_b, lora_a = group.b_cat @ cut.to_b.to(dtype), cut.to_a.to(dtype)
    return _result(group, settings, lora_b, lora_a, truncation_loss=cut.lost_energy)


# ---------------------------------------------------------------------------------------------- cat


@register(
    "cat",
    "concatenate the weighted factors: the exact result of a linear rule, rank R",
    "R (--rank is ignored)",
    needs_linear_rule=True,
    natural_rank=sum,
)
def concatenate(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """Exact merge of a linear rule by stacking each adapter's factors with its rule coefficient."""
    coefficients = _column_coefficients(group, settings)
    return _result(group, settings, group.b_cat * coefficients.to(group.b_cat), group.a_cat.clone())


# ---------------------------------------------------------------------------------------------- lego


def _kmeans_plus_plus(points: torch.Tensor, clusters: int, generator: torch.Generator | None) -> torch.Tensor:
    """Seeded k-means++ starts (G, k) indices into points (G, N, D): first uniform, then ∝ D².

    Draw j is u_j ~ U[0,1) float64 on the CPU, one per module; the index is ⌊u·N⌋, then the first
    point whose cumulative D² exceeds u·ΣD².
    """
    modules, count, _ = points.shape
    draw = torch.rand(modules, generator=generator, dtype=torch.float64).to(points.device)
    chosen = [(draw * count).floor().long().clamp_max(count - 1)]
    nearest = torch.full((modules, count), math.inf, dtype=points.dtype, device=points.device)
    for _ in range(1, clusters):
        center = points[torch.arange(modules, device=points.device), chosen[-1]]
        nearest = torch.minimum(nearest, (points - center.unsqueeze(-2)).square().sum(dim=-1))
        cumulative = nearest.cumsum(dim=-1)
        draw = torch.rand(modules, generator=generator, dtype=torch.float64).to(points.device)
        target = (draw * cumulative[:, -1]).unsqueeze(-1)
        chosen.append(torch.searchsorted(cumulative, target, right=True).squeeze(-1).clamp_max(count - 1))
    return torch.stack(chosen, dim=-1)


def kmeans(points: torch.Tensor, clusters: int, generator: torch.Generator | None) -> torch.Tensor:
    """Lloyd's k-means from seeded k-means++ starts; returns the assignment (G, N) of each point.

    Iterates until no assignment changes (at most KMEANS_MAX_ITERATIONS); ties go to the lower
    cluster; a cluster left empty keeps its previous centre.
    """
    starts = _kmeans_plus_plus(points, clusters, generator)
    centers = torch.gather(points, 1, starts.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    assignment = None
    for _ in range(KMEANS_MAX_ITERATIONS):
        new_assignment = torch.cdist(points, centers, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=-1)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        members = torch.nn.functional.one_hot(assignment, clusters).to(points.dtype)  # (G, N, k)
        counts = members.sum(dim=-2)
        means = (members.mT @ points) / counts.clamp_min(1).unsqueeze(-1)
        centers = torch.where(counts.unsqueeze(-1) > 0, means, centers)
    return assignment


@register(
    "lego",
    "LoRA-LEGO: k-means of all rank-1 units (b_i, a_i) into r clusters, centroids at their cluster's mean ∞-norm",
    "r, 1..min(R, out, in)",
    needs_linear_rule=True,
)
def lora_lego(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """LoRA-LEGO (Zhao et al. 2024) with the rule's coefficients folded into B.

    Units u_i = [c_t b_i; a_i] (b_i a scaled column of B_t, a_i the matching row of A_t) are put in
    a canonical order (decreasing ‖u_i‖, ties by position) so the result does not depend on the input
    order, then clustered by seeded k-means (k-means++ starts) into r clusters. Each centroid ū_k (the
    mean of its members) is scaled by ρ_k = mean_i ‖u_i‖_∞ / ‖ū_k‖_∞ over its members; the output is
    ΔW = √(R/r) · Σ_k ρ_k² b̄_k ā_kᵀ (√(R/r) goes into B). An empty final cluster contributes nothing.
    Distances are taken in core coordinates, where they equal the full-space ones.
    """
    space = cs.core_space(group.b_cat, group.a_cat, group.ranks)
    coefficients = _column_coefficients(group, settings).to(group.b_cat.device)
    raw_b, a64 = group.b_cat.to(torch.float64), group.a_cat.to(torch.float64)
    b64 = raw_b * coefficients
    # Unit coordinates in the core bases: Q_Bᵀ c_t b_i = leftᵀ B_catᵀ (c_t b_i), Q_Aᵀ a_i = rightᵀ A_cat a_i.
    b_coords = space.left.mT @ (raw_b.mT @ b64)
    a_coords = space.right.mT @ (a64 @ a64.mT)
    points = torch.cat([b_coords, a_coords], dim=-2).mT  # (G, R, 2R)
    peaks = torch.maximum(b64.abs().amax(dim=-2), a64.abs().amax(dim=-1))  # (G, R): ‖u_i‖_∞
    norms = b64.square().sum(dim=-2) + a64.square().sum(dim=-1)
    order = torch.sort(norms, dim=-1, descending=True, stable=True).indices
    clusters = settings.rank
    sorted_assignment = kmeans(
        torch.gather(points, 1, order.unsqueeze(-1).expand_as(points)), clusters, settings.generator
    )
    assignment = torch.empty_like(sorted_assignment).scatter_(1, order, sorted_assignment)
    members = torch.nn.functional.one_hot(assignment, clusters).to(torch.float64)  # (G, R, k)
    counts = members.sum(dim=-2)
    averaging = members / counts.clamp_min(1).unsqueeze(-2)
    centroid_b, centroid_a = b64 @ averaging, averaging.mT @ a64
    centroid_peak = torch.maximum(centroid_b.abs().amax(dim=-2), centroid_a.abs().amax(dim=-1))
    mean_peak = (members * peaks.unsqueeze(-1)).sum(dim=-2) / counts.clamp_min(1)
    rescale = torch.where(centroid_peak > 0, mean_peak / centroid_peak.clamp_min(1e-300), torch.zeros_like(mean_peak))
    total = sum(group.ranks)
    dtype = group.b_cat.dtype
    lora_b = (centroid_b * (rescale * math.sqrt(total / clusters)).unsqueeze(-2)).to(dtype)
    lora_a = (centroid_a * rescale.unsqueeze(-1)).to(dtype)
    return _result(group, settings, lora_b, lora_a)


# ---------------------------------------------------------------------------------------------- robustmerge


@register(
    "robustmerge",
    "RobustMerge: per-adapter top-k pruning of A and B, B's columns rescaled by A's kept mass, normalised, summed",
    "max r_t (--rank is ignored)",
    needs_linear_rule=True,
    natural_rank=max,
    params={"robust_density": Param(0.2, 0.0, 1.0, "fraction of each A_t and B_t kept by magnitude", open_low=True)},
)
def robustmerge(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """RobustMerge (Zeng et al. 2025) as the CtM paper runs it, factor by factor.

    For task t with rule coefficient c_t, B'_t = c_t s_t B_t and A_t (padded with zeros to r_max =
    max r_t): Â_t, B̂_t keep each matrix's `robust_density` fraction of entries by magnitude.
    γ_{t,i} = ‖A_t[i,:]‖₁ / ‖Â_t[i,:]‖₁ (0 for an empty row) compensates B's column i for what the
    pruning removed from A's row i; γ̄_{t,i} = γ_{t,i} / Σ_s γ_{s,i} normalises across tasks. Output:
    lora_B[:, i] = Σ_t γ̄_{t,i} B̂_t[:, i], lora_A[i, :] = Σ_t Â_t[i, :] (rank r_max).
    """
    density = settings.method_params["robust_density"]
    coefficients = linear_coefficients(settings.rule, settings.weights, settings.rule_params, settings.generator)
    width = max(group.ranks)
    columns, rows, gains = [], [], []
    for task, cols in enumerate(cs.column_slices(group.ranks)):
        b = group.b_cat[..., cols] * coefficients[task].to(group.b_cat)
        a = group.a_cat[..., cols, :]
        pruned_a = a * top_fraction_mask(a, density)
        kept_mass = pruned_a.abs().sum(dim=-1)
        gain = torch.where(kept_mass > 0, a.abs().sum(dim=-1) / kept_mass.clamp_min(1e-30), torch.zeros_like(kept_mass))
        padding = width - b.shape[-1]
        columns.append(torch.nn.functional.pad(b * top_fraction_mask(b, density), (0, padding)))
        rows.append(torch.nn.functional.pad(pruned_a, (0, 0, 0, padding)))
        gains.append(torch.nn.functional.pad(gain, (0, padding)))
    gain = torch.stack(gains)  # (T, G, r_max)
    share = gain.sum(dim=0)
    normalised = torch.where(share > 0, gain / share.clamp_min(1e-30), torch.zeros_like(gain))
    lora_b = sum(n.unsqueeze(-2) * b for n, b in zip(normalised, columns, strict=True))
    lora_a = sum(rows)
    return _result(group, settings, lora_b, lora_a)


# ---------------------------------------------------------------------------------------------- iso_cts


def iso_cts_split(rank: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common size k, per-task size s) with k + T·s = r, as Iso-CTS splits its rank budget."""
    per_task = math.floor((rank - math.floor(rank * common_fraction)) / tasks + 0.5)
    per_task = min(per_task, rank // tasks)
    return rank - tasks * per_task, per_task


@register(
    "iso_cts",
    "Iso-CTS: common subspace of the sum plus each task's residual subspace, isotropic spectrum, rank r",
    "r, 1..min(R, out, in)",
    needs_linear_rule=True,
    params={"iso_common": Param(0.8, 0.0, 1.0, "share of the rank given to the common subspace")},
)
def iso_cts(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """Iso-CTS (Marczak et al. 2025) at rank r, exactly, in core space.

    X_t = c_t C_t, Σ = Σ_t X_t. Split r into k common and s per task as the paper does: s =
    round_half_up((r − ⌊r·iso_common⌋)/T) (at most ⌊r/T⌋), k = r − T·s. Common: the top-k singular
    triplets (U_c, σ_c, V_c) of Σ. Task t: the top-s triplets of its residual X_t − U_c U_cᵀ X_t.
    The r left and r right vectors are each orthogonalised (polar factor) and the spectrum set to the
    mean σ̄ of the r chosen singular values: ΔW = σ̄ · U* V*ᵀ.
    """
    space = cs.core_space(group.b_cat, group.a_cat, group.ranks)
    coefficients = linear_coefficients(settings.rule, settings.weights, settings.rule_params, settings.generator)
    tasks = space.cores * coefficients.view(-1, 1, 1)
    common, per_task = iso_cts_split(settings.rank, len(group.ranks), settings.method_params["iso_common"])
    u, s, vh = torch.linalg.svd(tasks.sum(dim=-3), full_matrices=False)
    u_common = u[..., :common]
    residual = tasks - u_common.unsqueeze(-3) @ (u_common.mT.unsqueeze(-3) @ tasks)
    ru, rs, rvh = torch.linalg.svd(residual, full_matrices=False)
    left = torch.cat([u_common, *ru[..., :per_task].unbind(dim=-3)], dim=-1)
    right = torch.cat([vh[..., :common, :].mT, *rvh[..., :per_task, :].mT.unbind(dim=-3)], dim=-1)
    sigma = torch.cat([s[..., :common], rs[..., :per_task].flatten(-2)], dim=-1).mean(dim=-1)
    root = sigma.sqrt().view(-1, 1, 1)
    to_b = space.left @ cs.polar(left) * root
    to_a = (cs.polar(right) * root).mT @ space.right.mT
    lora_b, lora_a = _from_core_maps(group, to_b, to_a)
    return _result(group, settings, lora_b, lora_a)
