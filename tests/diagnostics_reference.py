"""Float64 NumPy references of the diagnosis figures (ctm_cli/diagnostics.py), written from their definitions in
the full out × in space (principal angles by SVDs of each factor, the updates ΔW_t themselves), not from ctm_cli's
code. Factors: B_t (out × r_t, already scaled) and A_t (r_t × in) of one module."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Matrices = Sequence[np.ndarray]
# Directions of a factor below this share of its largest singular value are absent (σ² below 1e-12 of σ_max²).
RELATIVE_RANK_TOLERANCE = 1e-6


def span_basis(x: np.ndarray) -> np.ndarray:
    """Orthonormal basis (d × k) of x's column span, k its numerical rank."""
    if x.size == 0:
        return np.zeros((x.shape[0], 0))
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, s > RELATIVE_RANK_TOLERANCE * s[0]] if s[0] > 0 else np.zeros((x.shape[0], 0))


def overlap(spans: Matrices) -> np.ndarray:
    """T × T mean cos² of the principal angles θ_i between span(X_s) and span(X_t), i = 1 … min(dim_s, dim_t)
    (0 where a span is empty)."""
    bases = [span_basis(x) for x in spans]
    result = np.zeros((len(bases), len(bases)))
    for s, first in enumerate(bases):
        for t, second in enumerate(bases):
            count = min(first.shape[1], second.shape[1])
            if count:
                cosines = np.linalg.svd(first.T @ second, compute_uv=False)[:count]
                result[s, t] = np.mean(cosines**2)
    return result


def cosines(deltas: Matrices) -> np.ndarray:
    """T × T ⟨ΔW_s, ΔW_t⟩ / (‖ΔW_s‖ ‖ΔW_t‖), 0 where an update is zero."""
    flat = np.stack([d.ravel() for d in deltas])
    norms = np.linalg.norm(flat, axis=1)
    outer = np.outer(norms, norms)
    return np.where(outer > 0, flat @ flat.T / np.where(outer > 0, outer, 1.0), 0.0)


def relative_norms(deltas: Matrices) -> np.ndarray:
    """‖ΔW_t‖ / mean_s ‖ΔW_s‖."""
    norms = np.array([np.linalg.norm(d) for d in deltas])
    return norms / norms.mean()


def conflict(coordinates: Matrices, weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per task: energy of the entries of w_t M_t whose sign differs from the elected one (the sign of the summed
    mass per entry, + for zero), entry by entry; and w_t M_t's energy."""
    weighted = [w * m for w, m in zip(weights, coordinates, strict=True)]
    mass = sum(weighted)
    against, energy = np.zeros(len(weighted)), np.zeros(len(weighted))
    for t, m in enumerate(weighted):
        for index in np.ndindex(m.shape):
            elected = 1.0 if mass[index] >= 0 else -1.0
            energy[t] += m[index] ** 2
            if m[index] != 0 and np.sign(m[index]) != elected:
                against[t] += m[index] ** 2
    return against, energy


def whole_frame_coordinates(bs: Matrices, as_: Matrices) -> list[np.ndarray]:
    """The cores in the singular bases of B_cat and A_catᵀ (ctm's default frame): Q_Bᵀ ΔW_t Q_A."""
    q_b = span_basis(np.hstack(bs))
    q_a = span_basis(np.vstack(as_).T)
    return [q_b.T @ (b @ a) @ q_a for b, a in zip(bs, as_, strict=True)]


def curve(merged: np.ndarray) -> np.ndarray:
    """Share of ‖merged‖² in its best rank-r approximation, r = 1 … min(m, n) (Eckart–Young, by truncation)."""
    u, s, vh = np.linalg.svd(merged, full_matrices=False)
    total = np.sum(merged**2)
    kept = [np.sum((u[:, :r] * s[:r] @ vh[:r]) ** 2) for r in range(1, len(s) + 1)]
    return np.array(kept) / total


def task_kept(merged: np.ndarray, coordinates: Matrices) -> np.ndarray:
    """T × K: ‖Π_col,r M_t Π_row,r‖² for the projectors on the column and row spaces of `merged`'s best rank-r
    approximation (its top min(r, rank) singular vectors; rank as matrix_rank counts it), r = 1 … K."""
    u, s, vh = np.linalg.svd(merged, full_matrices=False)
    rank = int(np.sum(s > max(merged.shape) * np.finfo(np.float64).eps * s[0]))
    rows = []
    for m in coordinates:
        row = []
        for r in range(1, len(s) + 1):
            k = min(r, rank)
            columns, inputs = u[:, :k] @ u[:, :k].T, vh[:k].T @ vh[:k]
            row.append(np.sum((columns @ m @ inputs) ** 2))
        rows.append(row)
    return np.array(rows)


def rank_for_keep(shares: np.ndarray, keep: float) -> int:
    """Smallest r with shares[r-1] ≥ keep (the last rank if none)."""
    for r, share in enumerate(shares, start=1):
        if share >= keep - 1e-12:
            return r
    return len(shares)
