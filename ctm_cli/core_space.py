"""Pure math of the core space and of CtM's shared subspaces; no I/O.

Every function is batched over leading dimensions so that all modules of one shape are processed by
one kernel launch. Shapes: G modules, T adapters, R = Σ r_t, r the output rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Directions of B_cat / A_cat whose squared singular value is below this fraction of the largest
# are treated as numerically absent (they carry < 1e-12 of the energy).
GRAM_RELATIVE_TOLERANCE = 1e-12


@dataclass(frozen=True)
class CoreSpace:
    """Orthonormal frames of B_cat and A_cat, as R × R maps, and the per-task R × R cores.

    Q_B = b_cat @ left and Q_A = a_catᵀ @ right are orthonormal (out × R, in × R) without ever being
    formed; ΔW_t = Q_B · cores[t] · Q_Aᵀ exactly.
    """

    left: torch.Tensor  # (..., R, R), float64
    right: torch.Tensor  # (..., R, R), float64
    cores: torch.Tensor  # (..., T, R, R), float64


@dataclass(frozen=True)
class SharedFrame:
    """Shared rank-r subspaces u (R × r) and v (R × r) of a set of cores, and how HOOI found them."""

    u: torch.Tensor  # (..., R, r)
    v: torch.Tensor  # (..., R, r)
    sweeps: torch.Tensor  # (...,) int
    energy: torch.Tensor  # (...,) Σ‖uᵀ C̃_t v‖² at convergence
    start_energy: torch.Tensor  # (...,) the same at the HOSVD start
    total_energy: torch.Tensor  # (...,) Σ‖C̃_t‖²


def gram_frame(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From X's Gram matrix XᵀX, the map to an orthonormal basis (Q = X @ map) and Qᵀ X itself.

    Q is X's left singular basis, its columns in decreasing order of singular value (numerically
    absent directions give zero columns, at the end).
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    eigenvalues, eigenvectors = eigenvalues.flip(-1), eigenvectors.flip(-1)
    largest = eigenvalues[..., :1].clamp_min(torch.finfo(gram.dtype).tiny)
    kept = eigenvalues > GRAM_RELATIVE_TOLERANCE * largest
    root = torch.where(kept, eigenvalues.clamp_min(0).sqrt(), torch.zeros_like(eigenvalues))
    inverse_root = torch.where(kept, 1.0 / root.where(kept, torch.ones_like(root)), torch.zeros_like(root))
    to_basis = eigenvectors * inverse_root.unsqueeze(-2)
    coordinates = (eigenvectors * root.unsqueeze(-2)).mT
    return to_basis, coordinates


def core_space(b_cat: torch.Tensor, a_cat: torch.Tensor, ranks: list[int]) -> CoreSpace:
    """Lossless core space of concatenated scaled factors b_cat (..., out, R) and a_cat (..., R, in).

    Uses the R × R Gram matrices (in float64) instead of QRs of the tall factors: the same span,
    at the cost of one small matrix product per side. The bases are the singular bases of b_cat and
    a_catᵀ (decreasing singular values), which fixes the coordinates element-wise rules see.
    """
    b64, a64 = b_cat.to(torch.float64), a_cat.to(torch.float64)
    left, r_b = gram_frame(b64.mT @ b64)
    right, r_a = gram_frame(a64 @ a64.mT)
    cores = torch.stack(
        [r_b[..., :, cols] @ r_a[..., :, cols].mT for cols in column_slices(ranks)],
        dim=-3,
    )
    return CoreSpace(left=left, right=right, cores=cores)


def column_slices(ranks: list[int]) -> list[slice]:
    """Column ranges of each task in the concatenated factors."""
    starts = [sum(ranks[:t]) for t in range(len(ranks))]
    return [slice(start, start + rank) for start, rank in zip(starts, ranks, strict=True)]


def balance(cores: torch.Tensor, beta: float) -> torch.Tensor:
    """CtM's balancing: rescale each task's core towards the mean norm (β=1: unchanged, β=0: equal)."""
    norms = torch.linalg.matrix_norm(cores).unsqueeze(-1).unsqueeze(-1)
    mean = norms.mean(dim=-3, keepdim=True)
    target = beta * norms + (1.0 - beta) * mean
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, cores / safe * target, cores)


def _top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    _, eigenvectors = torch.linalg.eigh(gram)
    return eigenvectors[..., -rank:].flip(-1)


def _captured(cores: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    projected = u.mT.unsqueeze(-3) @ cores @ v.unsqueeze(-3)
    return projected.square().sum(dim=(-3, -2, -1))


def shared_frame(cores: torch.Tensor, rank: int, tolerance: float = 1e-10, max_sweeps: int = 500) -> SharedFrame:
    """Rank-(r, r) partial Tucker of the cores (..., T, R, R) over their first two modes by HOOI.

    Starts from the HOSVD and alternates the two factor updates (each the top-r eigenvectors of an
    R × R Gram matrix) until the captured energy rises by less than `tolerance` (relative).
    """
    u = _top_eigenvectors((cores @ cores.mT).sum(dim=-3), rank)
    v = _top_eigenvectors((cores.mT @ cores).sum(dim=-3), rank)
    energy = start = _captured(cores, u, v)
    sweeps = torch.zeros(energy.shape, dtype=torch.int64, device=cores.device)
    active = torch.ones(energy.shape, dtype=torch.bool, device=cores.device)
    for _ in range(max_sweeps):
        cv = cores @ v.unsqueeze(-3)
        new_u = _top_eigenvectors((cv @ cv.mT).sum(dim=-3), rank)
        cu = cores.mT @ new_u.unsqueeze(-3)
        new_v = _top_eigenvectors((cu @ cu.mT).sum(dim=-3), rank)
        new_energy = _captured(cores, new_u, new_v)
        step = active.unsqueeze(-1).unsqueeze(-1)
        u, v = torch.where(step, new_u, u), torch.where(step, new_v, v)
        sweeps = sweeps + active.to(torch.int64)
        gain = (new_energy - energy) / energy.clamp_min(torch.finfo(energy.dtype).tiny)
        energy = torch.where(active, new_energy, energy)
        active = active & (gain >= tolerance)
        if not bool(active.any()):
            break
    total = cores.square().sum(dim=(-3, -2, -1))
    return SharedFrame(u=u, v=v, sweeps=sweeps, energy=energy, start_energy=start, total_energy=total)


def project(cores: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Coordinates M_t = uᵀ C_t v of every task's core in the shared frame (..., T, r, r)."""
    return u.mT.unsqueeze(-3) @ cores @ v.unsqueeze(-3)


@dataclass(frozen=True)
class Truncation:
    """A merged matrix split into LoRA maps at rank k, and the share of its energy the cut dropped."""

    to_b: torch.Tensor  # (..., R or out, k)
    to_a: torch.Tensor  # (..., k, R or in)
    lost_energy: torch.Tensor  # (...,) Σ_{i>k} σ_i² / Σ σ_i² (0 for a zero matrix)


def truncate(
    merged: torch.Tensor,
    rank: int,
    left_map: torch.Tensor | None = None,
    right_map: torch.Tensor | None = None,
    spectrum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Truncation:
    """Best rank-k split of ΔW = L · merged · Rmᵀ into LoRA maps, the singular values shared evenly.

    Returns to_b = L·P_k·√S_k and to_a = √S_k·Q_kᵀ·Rmᵀ (L, Rm default to the identity), so that
    lora_B = b_cat @ to_b, lora_A = to_a @ a_cat when L, Rm map the concatenated factors to the frame.
    `spectrum` remaps the kept singular values first (a spectral rule's rank-k form; a negative value
    puts its sign into to_b). lost_energy is measured on `merged`.
    """
    p, s, qh = torch.linalg.svd(merged, full_matrices=False)
    kept = s[..., :rank] if spectrum is None else spectrum(s[..., :rank])
    root = kept.abs().sqrt()
    to_b = p[..., :rank] * (kept.sign() * root).unsqueeze(-2)
    to_a = qh[..., :rank, :] * root.unsqueeze(-1)
    if left_map is not None:
        to_b = left_map @ to_b
    if right_map is not None:
        to_a = to_a @ right_map.mT
    energy = s.square()
    total = energy.sum(dim=-1)
    lost = energy[..., rank:].sum(dim=-1) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return Truncation(to_b, to_a, torch.where(total > 0, lost, torch.zeros_like(total)))


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns: P Qᵀ from the SVD P Σ Qᵀ (Procrustes)."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def _frobenius_squared(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """‖B·A‖² from the factors: Σ (BᵀB) ⊙ (AAᵀ), without forming B·A."""
    return ((b.mT @ b) * (a @ a.mT)).sum(dim=(-2, -1)).clamp_min(0)


def lowrank_relative_error(
    b_out: torch.Tensor, a_out: torch.Tensor, b_ref: torch.Tensor, a_ref: torch.Tensor
) -> torch.Tensor:
    """‖B_o A_o − B_r A_r‖ / ‖B_r A_r‖ in float64 from the factors alone (O((out+in)·k²) work)."""
    b = torch.cat([b_out, -b_ref], dim=-1).to(torch.float64)
    a = torch.cat([a_out, a_ref], dim=-2).to(torch.float64)
    reference = _frobenius_squared(b_ref.to(torch.float64), a_ref.to(torch.float64))
    return (_frobenius_squared(b, a) / reference.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()


def energy_in_output_spaces(
    b_out: torch.Tensor, a_out: torch.Tensor, b_cat: torch.Tensor, a_cat: torch.Tensor, ranks: list[int]
) -> torch.Tensor:
    """Per task, ‖Π_col ΔW_t Π_row‖² / ‖ΔW_t‖²: the share of each update inside the output's column
    and row spaces (1 for a task with no update). Shape (..., T)."""
    b_out, a_out = b_out.to(torch.float64), a_out.to(torch.float64)
    b_cat, a_cat = b_cat.to(torch.float64), a_cat.to(torch.float64)
    to_columns, _ = gram_frame(b_out.mT @ b_out)
    to_rows, _ = gram_frame(a_out @ a_out.mT)
    left = to_columns.mT @ (b_out.mT @ b_cat)  # (..., k, R): Q_colᵀ B_cat
    right = (a_cat @ a_out.mT) @ to_rows  # (..., R, k): A_cat Q_row
    shares = []
    for cols in column_slices(ranks):
        kept = (left[..., cols] @ right[..., cols, :]).square().sum(dim=(-2, -1))
        whole = _frobenius_squared(b_cat[..., cols], a_cat[..., cols, :])
        shares.append(torch.where(whole > 0, kept / whole.clamp_min(1e-300), torch.ones_like(whole)))
    return torch.stack(shares, dim=-1)
