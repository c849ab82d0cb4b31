"""Pure math of the diagnosis of a set of adapters before (or after) a merge; no I/O.

Every figure comes from the core space (DESIGN §1): R × R matrices, R = Σ r_t, never out × in ones; every
function is batched over leading dimensions (modules of one shape), as in core_space.py. What they tell:
- overlap: how much two adapters' column spaces (B) or row spaces (A) share (principal angles);
- cosine: how their updates ΔW_s, ΔW_t align (signed; the classic task-vector cosine);
- dominance: each adapter's ‖ΔW_t‖ against the mean (what CtM's β balances);
- conflict: the share of energy whose sign disagrees with the sign TIES elects, in a shared frame;
- energy kept by the rank-r merge, r = 1 … R, in all and per adapter, and the smallest rank keeping a share.
Figures are kept as energies (not shares) per module so that modules pool by summing (`summarize`).
Shapes: G modules, T adapters, R = Σ r_t, K the ranks a curve covers (min of the frame's sides).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ctm_cli import core_space as cs
from ctm_cli import small_linalg
from ctm_cli.fixed_order import matmul
from ctm_cli.params import Params
from ctm_cli.rules import Rule, weighted_sum

# A rank whose kept share falls short of the asked one by no more than this counts as keeping it (rounding of
# the cumulative sums; a share is a ratio of float64 sums).
KEEP_TOLERANCE = 1e-12
# The shares `ctm inspect` reports the smallest rank for.
REPORTED_KEEPS = (0.90, 0.95, 0.99)


def task_indicator(ranks: list[int], like: torch.Tensor) -> torch.Tensor:
    """(R, T) matrix with a 1 where column i of the concatenated factors belongs to task t."""
    owner = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks, dtype=torch.int64))
    return torch.nn.functional.one_hot(owner, len(ranks)).to(like)


def block_sums(matrix: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """(..., T, T): the sum of each (I_s, I_t) block of an (..., R, R) matrix, I_t task t's columns."""
    indicator = task_indicator(ranks, matrix)
    return matmul(matmul(indicator.mT, matrix), indicator)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor, empty: float) -> torch.Tensor:
    """numerator / denominator, `empty` where the denominator is zero."""
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.full_like(numerator, empty))


def subspace_overlap(coordinates: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """(..., T, T) mean cos² of the principal angles between the spans of each pair of tasks' columns of
    `coordinates` (..., R, R): ‖Q_sᵀ Q_t‖²_F / min(dim_s, dim_t) with Q_t an orthonormal basis of task t's span.

    1 for identical spans (and on the diagonal), 0 for orthogonal ones; 0 where a task spans nothing. With
    FactoredCores.b (= Q_Bᵀ B_cat) the spans are the adapters' column spaces, with .a their row spaces: the
    coordinates keep every inner product, so the angles are those of the full factors. Each Q_t comes from
    task t's Gram block alone (`gram_frame`), so the R × R Gram matrix is all it takes.
    """
    gram = matmul(coordinates.mT, coordinates)
    to_bases = torch.zeros_like(gram)
    for cols in cs.column_slices(ranks):
        if cols.stop > cols.start:
            to_bases[..., cols, cols] = cs.gram_frame(gram[..., cols, cols])[0]
    cosines = matmul(matmul(to_bases.mT, gram), to_bases)  # block (s, t) is Q_sᵀ Q_t
    squares = block_sums(cosines.square(), ranks)
    dims = squares.diagonal(dim1=-2, dim2=-1).round()  # ‖Q_tᵀ Q_t‖² = dim_t
    smaller = torch.minimum(dims.unsqueeze(-1), dims.unsqueeze(-2))
    return _ratio(squares, smaller, 0.0)


def update_inner_products(cores: cs.FactoredCores) -> torch.Tensor:
    """(..., T, T) ⟨ΔW_s, ΔW_t⟩ = ⟨C_s, C_t⟩ from the cores' factors: block sums of (bᵀb) ⊙ (aᵀa), times the
    scales (O(R³), no T·R² stack)."""
    products = matmul(cores.b.mT, cores.b) * matmul(cores.a.mT, cores.a)
    scales = cores.scales
    return block_sums(products, cores.ranks) * scales.unsqueeze(-1) * scales.unsqueeze(-2)


def update_cosines(inner_products: torch.Tensor) -> torch.Tensor:
    """(..., T, T) cosine ⟨ΔW_s, ΔW_t⟩ / (‖ΔW_s‖ ‖ΔW_t‖) from the inner products (0 where an update is zero)."""
    norms = inner_products.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    return _ratio(inner_products, norms.unsqueeze(-1) * norms.unsqueeze(-2), 0.0)


def relative_norms(norms: torch.Tensor) -> torch.Tensor:
    """(..., T) ‖ΔW_t‖ / mean_s ‖ΔW_s‖: above 1, an adapter dominates a plain sum. CtM's β moves every ratio
    towards 1 (β = 0: all equal in its frame search). 1 everywhere where every update is zero."""
    return _ratio(norms, norms.mean(dim=-1, keepdim=True).expand_as(norms), 1.0)


@dataclass(frozen=True)
class Conflict:
    """Sign conflict of T stacks of coordinates in one frame: per task, the energy of its entries whose sign is
    not the elected one (`against`) and its energy in the frame (`energy`); shares are against / energy."""

    against: torch.Tensor  # (..., T)
    energy: torch.Tensor  # (..., T)


def sign_conflict(coordinates: torch.Tensor, weights: torch.Tensor) -> Conflict:
    """Where the weighted coordinates w_t M_t (..., T, m, n) disagree with the sign TIES elects per entry: the
    sign of the summed mass Σ_t w_t M_t[i, j] (+ for an exact zero, as the ties rule elects).

    An entry of task t is against the election when it is nonzero and of the other sign; its energy is
    (w_t M_t[i, j])². No trimming: the figure describes the adapters in the frame, not one density. 0 for
    identical adapters; invariant to a common positive scale and to sign flips or reorderings of the frame's
    basis vectors (all tasks' entries move together), not to rotations: it belongs to the frame.
    """
    weighted = coordinates * weights.to(coordinates).view(-1, 1, 1)
    elected = torch.where(weighted.sum(dim=-3) >= 0, 1.0, -1.0).to(weighted).unsqueeze(-3)
    energies = weighted.square()
    against = (energies * (weighted * elected < 0)).sum(dim=(-2, -1))
    return Conflict(against=against, energy=energies.sum(dim=(-2, -1)))


def is_whole_frame(frame_rank: int, total_rank: int) -> bool:
    """Whether a frame of rank r' is the whole core space (r' = 0 asks for it; r' ≥ R is it)."""
    return frame_rank == 0 or frame_rank >= total_rank


def frame_coordinates(cores: cs.FactoredCores, frame_rank: int, beta: float = 1.0) -> torch.Tensor:
    """(..., T, r', r') the coordinates M_t = uᵀ C_t v that CtM's rule sees in a frame of rank r': the whole core
    space in its singular bases (u = v = I; r' = 0 or ≥ R, ctm's default) or the HOOI frame of the cores
    balanced by β (DESIGN §1). `frame_rank` is r' as the method resolved it (not clamped to the output rank here).
    """
    if is_whole_frame(frame_rank, cores.b.shape[-1]):
        return cores.dense()
    frame = cs.shared_frame_factored(cs.balance_factored(cores, beta), frame_rank)
    return cores.project(frame.u, frame.v)


@dataclass(frozen=True)
class MergeSpectrum:
    """The full-rank merge F = rule(M_1 … M_T) in a frame, by its singular triplets in the order a rank-r merge
    keeps them: F's rank-r form has the column space of left[..., :r], the row space of right[..., :r] and
    energy energies[..., :r].sum() (numerically absent triplets are zero columns, at the end)."""

    left: torch.Tensor  # (..., m, K)
    energies: torch.Tensor  # (..., K): σ_i²
    right: torch.Tensor  # (..., n, K)


def merge_spectrum(
    coordinates: torch.Tensor,
    rule: Rule[Any],
    weights: torch.Tensor,
    params: Params,
    generator: torch.Generator | None = None,
) -> MergeSpectrum:
    """The spectrum of the rule's full-rank merge of the coordinates (..., T, m, n), computed once: the energy
    a rank-r merge keeps, for every r, is the sum of its first r energies (Eckart–Young: cutting F to rank r
    keeps its top r triplets).

    A spectral rule (iso_c) keeps the top r triplets of the weighted sum with remapped values (its rank-r form,
    as the methods cut it), so its triplets are the sum's and its energies the remapped values squared.
    Triplets with σ ≤ max(m, n)·eps·σ_max (matrix_rank's cut) are numerically absent and their singular vectors
    arbitrary: they are zeroed, so a merge at a rank past F's numerical rank keeps what F keeps.
    """
    if rule.spectrum is not None:
        left, values, right_h = small_linalg.svd(weighted_sum(coordinates, weights))
        values = rule.spectrum(values, params, max(coordinates.shape[-2:]))
    else:
        merged = rule.function(coordinates, weights, params, generator)
        left, values, right_h = small_linalg.svd(merged)
    cut = max(coordinates.shape[-2:]) * torch.finfo(values.dtype).eps * values.abs().amax(dim=-1, keepdim=True)
    present = (values.abs() > cut).to(values)
    return MergeSpectrum(
        left=left * present.unsqueeze(-2), energies=values.square() * present, right=right_h.mT * present.unsqueeze(-2)
    )


def energy_curve(energies: torch.Tensor) -> torch.Tensor:
    """(..., K) share of the full-rank merge's energy a rank-r merge keeps, r = 1 … K: cumulative sums of the
    energies over their total (the last entry exactly 1; all 1 for a zero merge, which any rank keeps)."""
    cumulative = energies.cumsum(dim=-1)
    return _ratio(cumulative, cumulative[..., -1:].expand_as(cumulative), 1.0)


def task_energy_kept(coordinates: torch.Tensor, spectrum: MergeSpectrum) -> torch.Tensor:
    """(..., T, K) energy of each task's M_t inside the rank-r merge's column and row spaces, r = 1 … K:
    ‖P_rᵀ M_t Q_r‖² with P_r, Q_r the first r singular vectors — the energy `kept_energy` reports for a merge
    at rank r (divide by ‖ΔW_t‖² for the share). One T·K² stack: ‖P_rᵀ M_t Q_r‖² is the sum of the leading
    r × r block of (Pᵀ M_t Q)², read off a two-way cumulative sum."""
    inside = matmul(matmul(spectrum.left.mT.unsqueeze(-3), coordinates), spectrum.right.unsqueeze(-3))
    return inside.square().cumsum(dim=-1).cumsum(dim=-2).diagonal(dim1=-2, dim2=-1)


def rank_for_keep(curve: torch.Tensor, keep: float) -> torch.Tensor:
    """(...,) the smallest rank r (1 … K) whose merge keeps at least the share `keep` ∈ (0, 1] of the full-rank
    merge's energy, from a curve (..., K) as `energy_curve` or `pooled_curve` give it."""
    reached = curve >= keep - KEEP_TOLERANCE
    reached[..., -1] = True  # the full rank keeps everything
    return reached.to(torch.int64).argmax(dim=-1) + 1


def _extended(cumulative: torch.Tensor, width: int) -> torch.Tensor:
    """(..., width) energies kept at ranks 1 … K (..., K), the last value repeated past K: a module whose merge
    has rank K keeps everything at any larger rank."""
    padding = cumulative[..., -1:].expand(*cumulative.shape[:-1], width - cumulative.shape[-1])
    return torch.cat([cumulative, padding], dim=-1)


def _total(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of tensors of one shape."""
    return functools.reduce(torch.add, tensors)


def pooled_curve(energies: list[torch.Tensor]) -> torch.Tensor:
    """(K_max,) share of the energy of all modules' full-rank merges kept when every module is merged at rank r
    (modules of smaller K keep everything beyond K): the curve of one global --rank. Groups (G_i, K_i)."""
    width = max(group.shape[-1] for group in energies)
    kept = _total(_extended(group.cumsum(dim=-1), width).sum(dim=0) for group in energies)
    return _ratio(kept, kept[-1:].expand_as(kept), 1.0)


@dataclass(frozen=True)
class Diagnosis:
    """Everything `ctm inspect` shows of G modules of one shape (per module; energies so that modules pool)."""

    column_overlap: torch.Tensor  # (G, T, T): subspace_overlap of the B factors
    row_overlap: torch.Tensor  # (G, T, T): of the A factors
    inner_products: torch.Tensor  # (G, T, T): ⟨ΔW_s, ΔW_t⟩ (diagonal ‖ΔW_t‖²)
    conflict: Conflict  # (G, T) each, in the frame of rank `frame_rank`
    merge_energies: torch.Tensor  # (G, K): σ_i² of the full-rank merge in the whole core space
    task_kept: torch.Tensor  # (G, T, K): each task's energy inside the rank-r merge's spaces

    @property
    def norms(self) -> torch.Tensor:
        """(G, T) ‖ΔW_t‖."""
        return self.inner_products.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()


def diagnose(
    b_cat: torch.Tensor,
    a_cat: torch.Tensor,
    ranks: list[int],
    rule: Rule[Any],
    weights: torch.Tensor,
    params: Params,
    frame_rank: int = 0,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
) -> Diagnosis:
    """The diagnosis of G modules from their concatenated scaled factors b_cat (G, out, R), a_cat (G, R, in).

    The energy curves are those of ctm's default frame (the whole core space: the rule on the cores, then one
    cut), which for a linear or spectral rule, and for tsv when every r_t ≤ R / T, is also merge-then-compress
    with that rule; conflict is read in the frame of rank `frame_rank` (0: the whole core space).
    """
    cores = cs.factored_core_space(b_cat, a_cat, ranks).cores
    return diagnose_cores(cores, rule, weights, params, frame_rank, beta, generator)


def diagnose_cores(
    cores: cs.FactoredCores,
    rule: Rule[Any],
    weights: torch.Tensor,
    params: Params,
    frame_rank: int = 0,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
) -> Diagnosis:
    """`diagnose` from the modules' factored cores (for a caller that needs them for more)."""
    ranks = cores.ranks
    whole = cores.dense()
    framed = whole if is_whole_frame(frame_rank, sum(ranks)) else frame_coordinates(cores, frame_rank, beta)
    spectrum = merge_spectrum(whole, rule, weights, params, generator)
    return Diagnosis(
        column_overlap=subspace_overlap(cores.b, ranks),
        row_overlap=subspace_overlap(cores.a, ranks),
        inner_products=update_inner_products(cores),
        conflict=sign_conflict(framed, weights),
        merge_energies=spectrum.energies,
        task_kept=task_energy_kept(whole, spectrum),
    )


@dataclass(frozen=True)
class Summary:
    """A diagnosis over all modules: the figures of the whole adapters."""

    column_overlap: torch.Tensor  # (T, T): mean over modules
    row_overlap: torch.Tensor  # (T, T): mean over modules
    cosine: torch.Tensor  # (T, T): of the whole updates (all modules as one vector)
    dominance: torch.Tensor  # (T,): relative_norms of the whole updates
    conflict: torch.Tensor  # (): share of all energy against the elected signs
    task_conflict: torch.Tensor  # (T,): share of each task's energy against them
    curve: torch.Tensor  # (K_max,): pooled_curve, one rank for every module
    task_curve: torch.Tensor  # (T, K_max): share of each whole update inside the rank-r merge's spaces
    ranks_for_keeps: dict[float, int]  # REPORTED_KEEPS -> rank_for_keep(curve, keep)


def summarize(diagnoses: list[Diagnosis]) -> Summary:
    """Pool the diagnoses of all module groups: overlaps averaged over modules, energies summed (a module
    weighs by its update's energy), curves padded to the largest K."""
    column = torch.cat([d.column_overlap for d in diagnoses]).mean(dim=0)
    row = torch.cat([d.row_overlap for d in diagnoses]).mean(dim=0)
    inner = _total(d.inner_products.sum(dim=0) for d in diagnoses)
    against = _total(d.conflict.against.sum(dim=0) for d in diagnoses)
    energy = _total(d.conflict.energy.sum(dim=0) for d in diagnoses)
    curve = pooled_curve([d.merge_energies for d in diagnoses])
    width = curve.shape[-1]
    task_kept = _total(_extended(d.task_kept, width).sum(dim=0) for d in diagnoses)
    squared_norms = inner.diagonal().clamp_min(0)
    return Summary(
        column_overlap=column,
        row_overlap=row,
        cosine=update_cosines(inner),
        dominance=relative_norms(squared_norms.sqrt()),
        conflict=_ratio(against.sum(), energy.sum(), 0.0),
        task_conflict=_ratio(against, energy, 0.0),
        curve=curve,
        task_curve=_ratio(task_kept, squared_norms.unsqueeze(-1).expand_as(task_kept), 1.0),
        ranks_for_keeps={keep: int(rank_for_keep(curve, keep)) for keep in REPORTED_KEEPS},
    )

