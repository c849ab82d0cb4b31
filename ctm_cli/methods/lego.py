"""lego: LoRA-LEGO (Zhao et al. 2024), k-means of all rank-1 units into r clusters."""

from __future__ import annotations

import math

import torch

from ctm_cli import core_space as cs
from ctm_cli.fixed_order import matmul
from ctm_cli.methods.common import column_coefficients, result
from ctm_cli.methods.registry import FactorGroup, MergeResult, MergeSettings, register

KMEANS_MAX_ITERATIONS = 100


def _kmeans_plus_plus(points: torch.Tensor, clusters: int, generator: torch.Generator | None) -> torch.Tensor:
    """Seeded k-means++ starts (G, k) indices into points (G, N, D): first uniform, then ∝ D².

    Draw j is u_j ~ U[0,1) float64 on the CPU; the index is ⌊u·N⌋, then the first point whose cumulative
    D² exceeds u·ΣD². A module's k draws are taken together, module after module, so that they do not depend
    on how many modules share its group.
    """
    modules, count, _ = points.shape
    draws = torch.rand(modules, clusters, generator=generator, dtype=torch.float64).to(points.device)
    chosen = [(draws[:, 0] * count).floor().long().clamp_max(count - 1)]
    nearest = torch.full((modules, count), math.inf, dtype=points.dtype, device=points.device)
    for step in range(1, clusters):
        center = points[torch.arange(modules, device=points.device), chosen[-1]]
        nearest = torch.minimum(nearest, (points - center.unsqueeze(-2)).square().sum(dim=-1))
        cumulative = nearest.cumsum(dim=-1)
        target = (draws[:, step] * cumulative[:, -1]).unsqueeze(-1)
        chosen.append(torch.searchsorted(cumulative, target, right=True).squeeze(-1).clamp_max(count - 1))
    return torch.stack(chosen, dim=-1)


def kmeans(points: torch.Tensor, clusters: int, generator: torch.Generator | None) -> torch.Tensor:
    """Lloyd's k-means from seeded k-means++ starts; returns the assignment (G, N) of each point.

    Iterates until no assignment changes (at most KMEANS_MAX_ITERATIONS); ties go to the lower
    cluster; a cluster left empty keeps its previous centre.
    """
    starts = _kmeans_plus_plus(points, clusters, generator)
    centers = torch.gather(points, 1, starts.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    assignment = torch.full(points.shape[:-1], -1, dtype=torch.long, device=points.device)  # no cluster yet
    for _ in range(KMEANS_MAX_ITERATIONS):
        new_assignment = torch.cdist(points, centers, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=-1)
        if torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        members = torch.nn.functional.one_hot(assignment, clusters).to(points.dtype)  # (G, N, k)
        counts = members.sum(dim=-2)
        means = matmul(members.mT, points) / counts.clamp_min(1).unsqueeze(-1)
        centers = torch.where(counts.unsqueeze(-1) > 0, means, centers)
    return assignment


@register(
    "lego",
    "LoRA-LEGO: k-means of all rank-1 units (b_i, a_i) into r clusters, centroids at their cluster's mean ∞-norm",
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
    coefficients = column_coefficients(group, settings).to(group.b_cat.device)
    raw_b, a64 = group.b_cat.to(torch.float64), group.a_cat.to(torch.float64)
    b64 = raw_b * coefficients
    # Unit coordinates in the core bases: Q_Bᵀ c_t b_i = leftᵀ B_catᵀ (c_t b_i), Q_Aᵀ a_i = rightᵀ A_cat a_i.
    b_coords = matmul(space.left.mT, matmul(raw_b.mT, b64))
    a_coords = matmul(space.right.mT, matmul(a64, a64.mT))
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
    centroid_b, centroid_a = matmul(b64, averaging), matmul(averaging.mT, a64)
    centroid_peak = torch.maximum(centroid_b.abs().amax(dim=-2), centroid_a.abs().amax(dim=-1))
    mean_peak = (members * peaks.unsqueeze(-1)).sum(dim=-2) / counts.clamp_min(1)
    rescale = torch.where(centroid_peak > 0, mean_peak / centroid_peak.clamp_min(1e-300), torch.zeros_like(mean_peak))
    total = sum(group.ranks)
    dtype = group.b_cat.dtype
    lora_b = (centroid_b * (rescale * math.sqrt(total / clusters)).unsqueeze(-2)).to(dtype)
    lora_a = (centroid_a * rescale.unsqueeze(-1)).to(dtype)
    return result(group, settings, lora_b, lora_a)
