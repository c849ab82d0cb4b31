"""Float64 NumPy references of every merging rule and method, written from the formulas (DESIGN §1 and
the docstrings of ctm_cli.rules / ctm_cli.methods), not from ctm_cli's code.

Rules take a list of T matrices, the weights and their parameters; rules that draw random numbers
take the uniform draws (T × m × n, float32, as torch.rand makes them from the seeded generator) so a
test can feed both sides the same randomness. Methods take per-task factors B_t (out × r_t, already
multiplied by the LoRA scale s_t) and A_t (r_t × in) of one module and return the merged ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from reference import balance, hooi
from reference import core_space as qr_core_space

Matrices = Sequence[np.ndarray]
EPS = np.finfo(np.float64).eps


# ------------------------------------------------------------------------------------------- rules


def kept(size: int, density: float, trim_count: int = 0) -> int:
    """Entries a density keeps, at most `size`: nearest whole number (half up), at least one (trim_count 0);
    ⌊ρ·d⌋ + 1 (1: the TIES and CtM papers' code); ⌊ρ·d⌋, possibly none (2: PEFT)."""
    if trim_count == 1:
        return min(size, math.floor(density * size) + 1)
    if trim_count == 2:
        return min(size, math.floor(density * size))
    return min(size, max(1, math.floor(density * size + 0.5)))


def trim(x: np.ndarray, density: float, trim_count: int = 0) -> np.ndarray:
    """x with all but its kept(size, density, trim_count) largest-magnitude entries zeroed (ties at the cut kept)."""
    if density >= 1:
        return x.copy()
    count = kept(x.size, density, trim_count)
    if count == 0:
        return np.zeros_like(x)
    magnitudes = np.sort(np.abs(x).ravel())[::-1]
    return np.where(np.abs(x) >= magnitudes[count - 1], x, 0.0)


def ta(xs: Matrices, w: Sequence[float], lam: float = 1.0) -> np.ndarray:
    """λ Σ w_t X_t."""
    return lam * sum(wt * x for wt, x in zip(w, xs, strict=True))


def mean(xs: Matrices, w: Sequence[float]) -> np.ndarray:
    """Σ w_t X_t / Σ w_t."""
    return ta(xs, w) / sum(w)


def ties(
    xs: Matrices,
    w: Sequence[float],
    density: float = 0.2,
    by_count: bool = False,
    lam: float = 1.0,
    trim_count: int = 0,
):
    """Trim each w_t X_t, elect signs (mass, or count with even splits by mass; zero to +), mean of the
    agreeing kept entries, × λ."""
    trimmed = [trim(wt * x, density, trim_count) for wt, x in zip(w, xs, strict=True)]
    mass, count = sum(trimmed), sum(np.sign(t) for t in trimmed)
    votes = np.where(count != 0, count, mass) if by_count else mass
    sign = np.where(votes >= 0, 1.0, -1.0)
    agree = [np.sign(t) == sign for t in trimmed]
    total = sum(np.where(a, t, 0.0) for a, t in zip(agree, trimmed, strict=True))
    count = np.maximum(sum(a.astype(float) for a in agree), 1.0)
    return lam * total / count


def drop(xs: Matrices, uniform: np.ndarray, p: float) -> list[np.ndarray]:
    """DARE: keep where u ≥ p (compared in float32, as drawn), scale kept ones by 1/(1-p)."""
    return [np.where(u >= np.float32(p), x, 0.0) / (1 - p) for x, u in zip(xs, uniform, strict=True)]


def dare(xs: Matrices, w: Sequence[float], uniform: np.ndarray, drop_rate: float = 0.9, lam: float = 1.0):
    """DARE then task arithmetic."""
    return ta(drop(xs, uniform, drop_rate), w, lam)


def dare_ties(xs, w, uniform, drop_rate=0.9, density=1.0, by_count=False, lam=1.0, trim_count=0):
    """DARE then TIES."""
    return ties(drop(xs, uniform, drop_rate), w, density, by_count, lam, trim_count)


def polar(x: np.ndarray) -> np.ndarray:
    """P Qᵀ from x = P Σ Qᵀ."""
    p, _, qh = np.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv(xs: Matrices, w: Sequence[float], lam: float = 1.0) -> np.ndarray:
    """Each w_t X_t's top max(1, ⌊min(m,n)/T⌋) triplets (numerically nonzero ones), U's and V's polar, summed."""
    m, n = xs[0].shape
    k = max(1, min(m, n) // len(xs))
    us, ss, vs = [], [], []
    for wt, x in zip(w, xs, strict=True):
        u, s, vh = np.linalg.svd(wt * x, full_matrices=False)
        s = np.where(s[:k] > max(m, n) * EPS * s[0], s[:k], 0.0)
        us.append(u[:, :k] * (s > 0))
        vs.append(vh[:k].T * (s > 0))
        ss.append(s)
    return lam * polar(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ polar(np.hstack(vs)).T


def iso_c(xs: Matrices, w: Sequence[float], lam: float = 1.0, eps: float = EPS) -> np.ndarray:
    """Σ w_t X_t with its nonzero singular values (matrix_rank's cut) replaced by their mean, × λ."""
    u, s, vh = np.linalg.svd(ta(xs, w), full_matrices=False)
    rank = int(np.sum(s > max(u.shape[0], vh.shape[1]) * eps * s[0]))
    return lam * s[:rank].mean() * u[:, :rank] @ vh[:rank]


def magnitude_prune(
    xs: Matrices, w: Sequence[float], density: float = 0.2, lam: float = 1.0, trim_count: int = 0
) -> np.ndarray:
    """λ · trim(Σ w_t X_t)."""
    return lam * trim(ta(xs, w), density, trim_count)


def apply_rule(name: str, xs: Matrices, w: Sequence[float], params: dict, uniform: np.ndarray | None = None):
    """Dispatch on the rule name with ctm's parameter names (sign_count as 0/1, trim_count as 0/1/2)."""
    lam = params.get("lambda", 1.0)
    count = int(params.get("trim_count", 0))
    if name == "ta":
        return ta(xs, w, lam)
    if name == "mean":
        return mean(xs, w)
    if name == "ties":
        return ties(xs, w, params.get("density", 0.2), bool(params.get("sign_count", 0)), lam, count)
    if name == "dare":
        return dare(xs, w, uniform, params.get("drop_rate", 0.9), lam)
    if name == "dare_ties":
        density = params.get("density", 1.0)
        by_count = bool(params.get("sign_count", 0))
        return dare_ties(xs, w, uniform, params.get("drop_rate", 0.9), density, by_count, lam, count)
    if name == "tsv":
        return tsv(xs, w, lam)
    if name == "iso_c":
        return iso_c(xs, w, lam)
    if name == "magnitude_prune":
        return magnitude_prune(xs, w, params.get("density", 0.2), lam, count)
    raise KeyError(name)


def linear_coefficients(name: str, w: Sequence[float], params: dict) -> list[float]:
    """c_t of a linear rule: λ w_t (ta) or w_t / Σ w (mean)."""
    if name == "ta":
        return [params.get("lambda", 1.0) * wt for wt in w]
    return [wt / sum(w) for wt in w]


# ------------------------------------------------------------------------------------------- methods

Rule = Callable[[Matrices, np.ndarray | None], np.ndarray]  # (matrices, uniform draws) -> merged


def updates(bs: Matrices, as_: Matrices) -> list[np.ndarray]:
    """ΔW_t = B_t A_t (B_t scaled)."""
    return [b @ a for b, a in zip(bs, as_, strict=True)]


def truncated(x: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    """Best rank-k approximation and the share of energy it drops."""
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    energy = s**2
    return u[:, :rank] * s[:rank] @ vh[:rank], float(energy[rank:].sum() / energy.sum())


def iso_c_at_rank(xs: Matrices, w: Sequence[float], rank: int, lam: float = 1.0) -> tuple[np.ndarray, float]:
    """Iso-C's rank-k form: the top k triplets of Σ w_t X_t with their (nonzero) values replaced by their
    mean; and the share of the sum's energy beyond k."""
    total = ta(xs, w)
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    top = s[:rank][s[:rank] > max(total.shape) * EPS * s[0]]
    energy = s**2
    flat = lam * top.mean() * u[:, : len(top)] @ vh[: len(top)]
    return flat, float(energy[rank:].sum() / energy.sum())


def cut_rule(rule: Rule, rank: int, name: str = "", w: Sequence[float] = (), lam: float = 1.0):
    """The merge-and-cut a method applies: truncated(rule(xs)), or Iso-C's rank-k form for iso_c."""
    if name == "iso_c":
        return lambda xs: iso_c_at_rank(xs, w, rank, lam)
    return lambda xs: truncated(rule(xs), rank)


def flattened(x: np.ndarray) -> np.ndarray:
    """x with its numerically nonzero singular values replaced by their mean (Iso-C's spectrum)."""
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    present = s > max(x.shape) * EPS * s[0]
    return s[present].mean() * u[:, present] @ vh[present]


def draws(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The uniform float32 draws torch makes for a stack of `shape` from a fresh generator with `seed`."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).numpy()


def ctm(bs, as_, rank: int, rule: Rule, beta: float = 1.0, cut: Callable | None = None) -> np.ndarray:
    """CtM: QR core space, HOOI frame of the balanced cores at rank r' = `rank`, rule on uᵀ C_t v, then
    (with `cut`, see cut_rule) the merge-and-cut to the output rank; Q_B u M vᵀ Q_Aᵀ."""
    space = qr_core_space(as_, bs, [1.0] * len(bs))
    frame = hooi(balance(space.cores, beta), rank)
    coordinates = [frame.u.T @ c @ frame.v for c in space.cores]
    merged = rule(coordinates) if cut is None else cut(coordinates)[0]
    return space.q_b @ frame.u @ merged @ frame.v.T @ space.q_a.T


def mtc(bs, as_, cut: Callable) -> tuple[np.ndarray, float]:
    """Merge-then-compress: the rule on the full updates, cut to rank (see cut_rule)."""
    return cut(updates(bs, as_))


def svd_core_space(bs, as_) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Q_B, Q_A = singular bases of B_cat and A_catᵀ (decreasing σ); cores C_t = Q_Bᵀ ΔW_t Q_A."""
    q_b = np.linalg.svd(np.hstack(bs), full_matrices=False)[0]
    q_a = np.linalg.svd(np.vstack(as_).T, full_matrices=False)[0]
    return q_b, q_a, [q_b.T @ d @ q_a for d in updates(bs, as_)]


def core(bs, as_, cut: Callable) -> tuple[np.ndarray, float]:
    """Core Space merging: rule on the cores, cut to rank by SVD, mapped back."""
    q_b, q_a, cores = svd_core_space(bs, as_)
    merged, lost = cut(cores)
    return q_b @ merged @ q_a.T, lost


def knots(bs, as_, cut: Callable) -> tuple[np.ndarray, float]:
    """KnOTS in full space: [ΔW_1 … ΔW_T] = U S [V_1 … V_T]ᵀ (nonzero σ only), rule on S V_tᵀ, U·merged."""
    deltas = updates(bs, as_)
    u, s, vh = np.linalg.svd(np.hstack(deltas), full_matrices=False)
    k = int(np.sum(s > max(u.shape[0], vh.shape[1]) * EPS * s[0]))
    n = deltas[0].shape[1]
    right = [s[:k, None] * vh[:k, t * n : (t + 1) * n] for t in range(len(deltas))]
    merged, lost = cut(right)
    return u[:, :k] @ merged, lost


def cat(bs, as_, coefficients: Sequence[float]) -> np.ndarray:
    """Σ c_t ΔW_t."""
    return sum(c * d for c, d in zip(coefficients, updates(bs, as_), strict=True))


def lego(bs, as_, rank: int, coefficients: Sequence[float], seed: int, max_iterations: int = 100) -> np.ndarray:
    """LoRA-LEGO: units [c_t b_i; a_i] sorted by decreasing norm, k-means++ (draws u ~ U[0,1) float64 from
    the seeded generator: ⌊u·N⌋, then the first unit whose cumulative D² exceeds u·ΣD²), Lloyd until
    stable (ties to the lower cluster, empty clusters keep their centre), centroids rescaled to their
    members' mean ∞-norm, ΔW = √(R/r) Σ_k b̄_k ā_kᵀ."""
    out = bs[0].shape[0]
    units = np.array(
        [
            np.concatenate([c * b[:, i], a[i]])
            for c, b, a in zip(coefficients, bs, as_, strict=True)
            for i in range(a.shape[0])
        ]
    )
    units = units[np.argsort(-np.sum(units**2, axis=1), kind="stable")]
    generator = torch.Generator().manual_seed(seed)

    def uniform() -> float:
        return float(torch.rand(1, generator=generator, dtype=torch.float64))

    count = len(units)
    chosen = [min(int(uniform() * count), count - 1)]
    nearest = np.full(count, np.inf)
    for _ in range(1, rank):
        nearest = np.minimum(nearest, np.sum((units - units[chosen[-1]]) ** 2, axis=1))
        cumulative = np.cumsum(nearest)
        chosen.append(min(int(np.searchsorted(cumulative, uniform() * cumulative[-1], side="right")), count - 1))
    centers = units[chosen].copy()
    assignment = None
    for _ in range(max_iterations):
        distances = np.sum((units[:, None, :] - centers[None]) ** 2, axis=2)
        new = np.argmin(distances, axis=1)
        if assignment is not None and np.array_equal(new, assignment):
            break
        assignment = new
        for k in range(rank):
            if np.any(assignment == k):
                centers[k] = units[assignment == k].mean(axis=0)
    delta = 0.0
    for k in range(rank):
        members = units[assignment == k]
        if len(members) == 0:
            continue
        centroid = members.mean(axis=0)
        centroid = centroid * np.abs(members).max(axis=1).mean() / np.abs(centroid).max()
        delta = delta + np.outer(centroid[:out], centroid[out:])
    return math.sqrt(count / rank) * delta


def robustmerge(bs, as_, coefficients: Sequence[float], density: float = 0.2) -> np.ndarray:
    """Prune each c_t B_t and A_t to its top entries; B's column i × γ̄_{t,i}, γ = ‖A_t[i]‖₁ / ‖Â_t[i]‖₁
    normalised over the tasks that have a rank-i unit; ΔW = (Σ B̂'_t)(Σ Â_t) with factors padded to max r_t."""
    width = max(a.shape[0] for a in as_)
    out, inp = bs[0].shape[0], as_[0].shape[1]
    b_sum, a_sum = np.zeros((out, width)), np.zeros((width, inp))
    gains = np.zeros((len(bs), width))
    pruned_b = []
    for t, (c, b, a) in enumerate(zip(coefficients, bs, as_, strict=True)):
        a_hat = trim(a, density)
        pruned_b.append(trim(c * b, density))
        kept_mass = np.abs(a_hat).sum(axis=1)
        gains[t, : a.shape[0]] = np.where(
            kept_mass > 0, np.abs(a).sum(axis=1) / np.where(kept_mass > 0, kept_mass, 1), 0
        )
        a_sum[: a.shape[0]] += a_hat
    share = gains.sum(axis=0)
    for t, b_hat in enumerate(pruned_b):
        normalised = np.where(share > 0, gains[t] / np.where(share > 0, share, 1), 0)
        b_sum[:, : b_hat.shape[1]] += b_hat * normalised[: b_hat.shape[1]]
    return b_sum @ a_sum


def iso_cts(bs, as_, rank: int, coefficients: Sequence[float], common_fraction: float = 0.8) -> np.ndarray:
    """Iso-CTS in full space: common top-k of Σ c_t ΔW_t, top-s of each residual, polar, mean σ."""
    tasks = [c * d for c, d in zip(coefficients, updates(bs, as_), strict=True)]
    per_task = min(math.floor((rank - math.floor(rank * common_fraction)) / len(tasks) + 0.5), rank // len(tasks))
    common = rank - len(tasks) * per_task
    u, s, vh = np.linalg.svd(sum(tasks), full_matrices=False)
    lefts, rights, sigmas = [u[:, :common]], [vh[:common].T], [s[:common]]
    for x in tasks:
        ru, rs, rvh = np.linalg.svd(x - u[:, :common] @ (u[:, :common].T @ x), full_matrices=False)
        lefts.append(ru[:, :per_task])
        rights.append(rvh[:per_task].T)
        sigmas.append(rs[:per_task])
    return np.concatenate(sigmas).mean() * polar(np.hstack(lefts)) @ polar(np.hstack(rights)).T
