"""An independent float64 NumPy reference of CtM with task arithmetic (DESIGN.md §1).

Written from the formulas, not from ctm_cli: thin QRs of the concatenated factors, per-task cores,
balancing, HOOI started from the HOSVD with plain SVDs, projection, task arithmetic, reconstruction.
Shapes: A_t is r_t × in, B_t is out × r_t (as PEFT stores lora_A / lora_B).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The reference runs HOOI to its fixed point: until a sweep moves neither subspace by more than this (sine of
# the largest principal angle; float64 rounding is ~1e-15), or the cap. DESIGN's stopping rule (relative energy
# gain < 1e-10) can stop plain HOOI where the energy is flat, up to ~1e-4 away from that point, at a place that
# depends on the path; the product must land within the tests' tolerances of the fixed point itself.
HOOI_STEP_TOLERANCE = 1e-12
HOOI_MAX_SWEEPS = 20_000


def peft_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def config_scale(config: dict, module_name: str | None = None) -> float:
    """The scale an adapter_config.json gives a module (rank_pattern / alpha_pattern honoured by suffix)."""
    r, alpha = config["r"], config["lora_alpha"]
    if module_name is not None:
        r = _pattern(config.get("rank_pattern") or {}, module_name, r)
        alpha = _pattern(config.get("alpha_pattern") or {}, module_name, alpha)
    return peft_scale(alpha, r, bool(config.get("use_rslora", False)))


def _pattern(patterns: dict, name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _as64(matrices: Sequence) -> list[np.ndarray]:
    return [np.asarray(m, dtype=np.float64) for m in matrices]


def _weights(weights: Sequence[float] | None, count: int) -> np.ndarray:
    return np.ones(count) if weights is None else np.asarray(weights, dtype=np.float64)


def exact_sum(
    As: Sequence,
    Bs: Sequence,
    scales: Sequence[float],
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
) -> np.ndarray:
    """λ Σ_t w_t s_t B_t A_t, the full-rank task-arithmetic merge."""
    As, Bs = _as64(As), _as64(Bs)
    w = _weights(weights, len(As))
    return lam * sum(w_t * s_t * (b @ a) for a, b, s_t, w_t in zip(As, Bs, scales, w, strict=True))


@dataclass(frozen=True)
class CoreSpaceRef:
    """Q_B (out × k_B), Q_A (in × k_A) and the per-task cores C_t (k_B × k_A) with ΔW_t = Q_B C_t Q_Aᵀ."""

    q_b: np.ndarray
    q_a: np.ndarray
    cores: list[np.ndarray]


def core_space(As: Sequence, Bs: Sequence, scales: Sequence[float]) -> CoreSpaceRef:
    """B_cat = [s_t B_t], A_cat = [A_t]; thin QRs; C_t = R_B[:, I_t] R_A[:, I_t]ᵀ."""
    As, Bs = _as64(As), _as64(Bs)
    b_cat = np.hstack([s * b for s, b in zip(scales, Bs, strict=True)])
    a_cat = np.vstack(As)
    q_b, r_b = np.linalg.qr(b_cat, mode="reduced")
    q_a, r_a = np.linalg.qr(a_cat.T, mode="reduced")
    cores, start = [], 0
    for a in As:
        cols = slice(start, start + a.shape[0])
        cores.append(r_b[:, cols] @ r_a[:, cols].T)
        start += a.shape[0]
    return CoreSpaceRef(q_b=q_b, q_a=q_a, cores=cores)


def balance(cores: Sequence[np.ndarray], beta: float) -> list[np.ndarray]:
    """C̃_t = C_t / ‖C_t‖ · (β‖C_t‖ + (1−β)·mean_s ‖C_s‖); a zero core stays zero."""
    norms = [float(np.linalg.norm(c)) for c in cores]
    mean = sum(norms) / len(norms)
    return [c / n * (beta * n + (1.0 - beta) * mean) if n > 0 else c.copy() for c, n in zip(cores, norms, strict=True)]


def _top_left(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, _, _ = np.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank]


def _energy(cores: Sequence[np.ndarray], u: np.ndarray, v: np.ndarray) -> float:
    return float(sum(np.sum((u.T @ c @ v) ** 2) for c in cores))


@dataclass(frozen=True)
class HooiRef:
    """The shared frame u, v and how HOOI got there."""

    u: np.ndarray
    v: np.ndarray
    start_energy: float  # Σ‖uᵀC̃_t v‖² at the HOSVD start
    energy: float  # the same at convergence
    total_energy: float  # Σ‖C̃_t‖²
    sweeps: int


def _largest_sine(old: np.ndarray, new: np.ndarray) -> float:
    """Sine of the largest principal angle between the spans of two orthonormal bases."""
    return float(np.linalg.norm(old - new @ (new.T @ old), 2))


def hooi(
    cores: Sequence[np.ndarray],
    rank: int,
    step_tolerance: float = HOOI_STEP_TOLERANCE,
    max_sweeps: int = HOOI_MAX_SWEEPS,
) -> HooiRef:
    """Rank-(r, r) partial Tucker of [C̃_1 … C̃_T] over the first two modes, from the HOSVD, by SVDs, alternating
    until the subspaces stop moving."""
    u = _top_left(np.hstack(cores), rank)
    _, _, vh = np.linalg.svd(np.vstack(cores), full_matrices=False)
    v = vh[:rank].T
    energy = start = _energy(cores, u, v)
    sweeps = 0
    for _ in range(max_sweeps):
        old_u, old_v = u, v
        u = _top_left(np.hstack([c @ v for c in cores]), rank)
        v = _top_left(np.hstack([c.T @ u for c in cores]), rank)
        energy = _energy(cores, u, v)
        sweeps += 1
        if max(_largest_sine(old_u, u), _largest_sine(old_v, v)) <= step_tolerance:
            break
    total = float(sum(np.sum(c**2) for c in cores))
    return HooiRef(u=u, v=v, start_energy=start, energy=energy, total_energy=total, sweeps=sweeps)


@dataclass(frozen=True)
class CtmRef:
    """Result of the reference CtM-TA merge of one module."""

    delta: np.ndarray  # ΔW = Q_B u M vᵀ Q_Aᵀ  (out × in)
    coordinates: list[np.ndarray]  # M_t = uᵀ C_t v
    merged: np.ndarray  # M = λ Σ w_t M_t
    kept_energy: list[float]  # ‖M_t‖² / ‖C_t‖² (unbalanced)
    frame: HooiRef
    exact: np.ndarray  # λ Σ w_t s_t B_t A_t

    @property
    def relative_error(self) -> float:
        """‖ΔW − exact‖ / ‖exact‖."""
        return float(np.linalg.norm(self.delta - self.exact) / np.linalg.norm(self.exact))


def ctm_ta(
    As: Sequence,
    Bs: Sequence,
    scales: Sequence[float],
    rank: int,
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
    beta: float = 1.0,
) -> CtmRef:
    """CtM with task arithmetic for one module, per DESIGN.md §1."""
    space = core_space(As, Bs, scales)
    frame = hooi(balance(space.cores, beta), rank)
    coordinates = [frame.u.T @ c @ frame.v for c in space.cores]
    w = _weights(weights, len(coordinates))
    merged = lam * sum(w_t * m for w_t, m in zip(w, coordinates, strict=True))
    delta = space.q_b @ frame.u @ merged @ frame.v.T @ space.q_a.T
    kept = [
        float(np.sum(m**2) / np.sum(c**2)) if np.sum(c**2) > 0 else 1.0
        for m, c in zip(coordinates, space.cores, strict=True)
    ]
    return CtmRef(
        delta=delta,
        coordinates=coordinates,
        merged=merged,
        kept_energy=kept,
        frame=frame,
        exact=exact_sum(As, Bs, scales, weights, lam),
    )


def ctm_ta_delta(As, Bs, scales, rank, weights=None, lam=1.0, beta=1.0) -> np.ndarray:
    """ΔW of the reference CtM-TA merge."""
    return ctm_ta(As, Bs, scales, rank, weights, lam, beta).delta


def hosvd_energy(As, Bs, scales, rank, beta=1.0) -> float:
    """Σ‖uᵀC̃_t v‖² at the HOSVD start."""
    return hooi(balance(core_space(As, Bs, scales).cores, beta), rank).start_energy


def final_energy(As, Bs, scales, rank, beta=1.0) -> float:
    """Σ‖uᵀC̃_t v‖² when HOOI has converged."""
    return hooi(balance(core_space(As, Bs, scales).cores, beta), rank).energy
