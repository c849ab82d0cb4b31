"""Batches of small SVDs, symmetric eigendecompositions and polar factors, solved where they are fastest.

cuSOLVER batches these only up to 32 × 32 and solves larger matrices one at a time, each call bound by its
latency: about 2.5 ms per 128 × 128 SVD and 1.5 ms per eigh on an H200, so the few hundred modules of a wave
spend seconds there. LAPACK on the host takes a little longer per matrix on one core, but a batch spreads over
the cores: a batch of CUDA matrices is solved on the host, cut into one chunk per core, each chunk on one thread,
where that is estimated to be clearly faster (`host_is_faster`: 6–15× on 16 cores for a wave of 128 × 128
matrices; docs/benchmarks.md). CPU tensors, matrices cuSOLVER batches, and the rest are solved where they are.
Polar factors and Gram matrices' square roots on a GPU need no solver at all: Newton–Schulz iterations are
batched matrix products (`polar`, `square_roots`).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ctm_cli.fixed_order import matmul, one_torch_thread

# cuSOLVER's batched Jacobi solvers take matrices up to this size on a side: those stay on the device, but eigh's
# (see `eigh`).
DEVICE_BATCHED_MAX_SIZE = 32
# One n × n matrix (n the longer side) costs LAPACK on one host core about this many times, times n / 128, what it
# costs cuSOLVER's one-matrix loop (measured on an H200 host: SVD 1.5 at 128, 3 at 256 and 512, 6 at 1024; eigh
# in float64 1.2, 4.9 and 7.4 at 128, 256 and 512).
HOST_COST_RATIO_AT_128 = 1.5
# The host is chosen only where the estimate makes it at least this many times faster (transfers, threads).
HOST_MARGIN = 2.0
# Newton–Schulz iterations (`newton_schulz_polar`, `square_roots`): steps between two checks (a check waits for the
# device), the most they run, and the distance from I (‖YᵀY − I‖_F, ‖ZY − I‖_F) below which three more steps take
# them to rounding (the error squares: 1e-3 → 1e-6 → 1e-12 → rounding). Singular values down to ~1e-9 of the
# largest settle within the limit.
SETTLE_CHECK_EVERY = 8
SETTLE_MAX_STEPS = 64
SETTLED_DRIFT = 1e-3
POLISH_STEPS = 3

if TYPE_CHECKING:  # torch.Tensor at run time would import torch (see deferred_import)
    Solver = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]

_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vᴴ) of a batch of matrices, as torch.linalg.svd(full_matrices=False) gives it."""
    u, s, vh = _solve(_thin_svd, matrix)
    return u, s, vh


def eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a batch of symmetric matrices, as torch.linalg.eigh gives them.
    A CUDA batch of matrices cuSOLVER would batch goes to the host too: its batched Jacobi eigh takes about 0.6 MiB
    of device workspace per matrix (measured on an H200, torch 2.11: 7.2 MiB for 12 float64 16 × 16 matrices,
    1.05 GiB for 1 792), which no memory plan holds, where LAPACK needs microseconds a matrix."""
    values, vectors = _solve(torch.linalg.eigh, matrix, batched_on_host=True)
    return values, vectors


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The polar factor P Qᵀ of a batch of matrices (thin SVD P Σ Qᵀ): the nearest matrices with orthonormal columns
    (rows, if wide). On the CPU from LAPACK's SVD; elsewhere by Newton–Schulz iterations, with the SVD for the
    matrices they do not settle on (see `polar_by_iteration`). Where columns (rows) are exactly zero, no polar
    factor is unique: the SVD completes them arbitrarily, the iterations leave them zero (see `newton_schulz_polar`);
    a caller gives them no weight (TSV's absent triplets)."""
    return polar_by_iteration(matrix) if iterates_on(matrix.device) else _svd_polar(matrix)


def iterates_on(device: torch.device) -> bool:
    """Whether polar factors and matrix square roots are computed by Newton–Schulz iterations on `device`: on an
    accelerator (batched products beat its one-matrix-at-a-time solvers), not on the CPU (LAPACK is faster there)."""
    return device.type != "cpu"


def polar_by_iteration(matrix: torch.Tensor) -> torch.Tensor:
    """`polar` by Newton–Schulz iterations (a few dozen batched products for the whole batch, where a GPU's SVD
    loops over the matrices at ~2.5 ms each), and by the SVD for the matrices they leave unsettled: rank-deficient
    ones other than by zero columns, whose polar factor only the SVD's arbitrary completion fixes, and very
    ill-conditioned ones."""
    wide = matrix.shape[-2] < matrix.shape[-1]
    tall = matrix.mT if wide else matrix
    if tall.numel() == 0:
        return _svd_polar(matrix)
    factor, settled = newton_schulz_polar(tall)
    if not bool(settled.all()):
        unsettled = ~settled
        factor[unsettled] = _svd_polar(tall[unsettled])
    return factor.mT if wide else factor


def newton_schulz_polar(tall: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton–Schulz's Y ← Y (3E − YᵀY) / 2 from X / √‖XᵀX‖_∞ (every singular value in (0, 1]) for a batch of
    tall matrices X (..., m, k), m ≥ k, and whether each settled (`_settle`), E being the identity on X's columns
    that are not exactly zero (`_identity_on_nonzero`). A settled Y is X's polar factor (the iteration maps every
    positive singular value to 1 and keeps the singular vectors); a zero singular value stays zero, so a
    rank-deficient X does not settle, except where the deficiency is columns that are exactly zero: they stay zero
    (a zero column never mixes in; E, which is I otherwise, only spares a step multiplying them), the check is
    against E, and such an X settles to the polar factor of its other columns beside them."""
    target = _identity_on_nonzero(tall.abs().amax(dim=-2))

    def step(state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        (factor,) = state
        return (matmul(factor, 1.5 * target - 0.5 * matmul(factor.mT, factor)),)

    def drift(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.linalg.matrix_norm(matmul(state[0].mT, state[0]) - target)

    start = tall / _largest_eigenvalue_bound(matmul(tall.mT, tall)).sqrt()[..., None, None]
    (factor,), settled = _settle(step, drift, (start,))
    return factor, settled


def square_roots(gram: torch.Tensor, condition_limit: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G^½, G^-½ of a batch of symmetric positive semi-definite matrices by the coupled Newton–Schulz iteration
    (Y ← Y T, Z ← T Z with T = (3E − Z Y) / 2, from Y = G / c, Z = E, c ≥ G's largest eigenvalue: batched products
    only), and whether each settled (`_settle`) with a condition number at most `condition_limit` (cond(G) ≤
    c · ‖G^-½‖²_F). E is the identity on the rows and columns of G that are not exactly zero (the Gram matrix of
    columns that are, as padding makes them) and zero on those: the iteration runs on the rest, and those stay zero
    in both results. Any other singular G does not settle (a zero eigenvalue stays zero)."""
    target = _identity_on_nonzero(gram.diagonal(dim1=-2, dim2=-1))

    def step(state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        root, inverse = state
        half = 1.5 * target - 0.5 * matmul(inverse, root)
        return matmul(root, half), matmul(half, inverse)

    def drift(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.linalg.matrix_norm(matmul(state[1], state[0]) - target)

    bound = _largest_eigenvalue_bound(gram)[..., None, None]
    (root, inverse), settled = _settle(step, drift, (gram / bound, target))
    settled = settled & (torch.linalg.matrix_norm(inverse).square() <= condition_limit)
    return root * bound.sqrt(), inverse / bound.sqrt(), settled


def _settle(
    step: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]],
    drift: Callable[[tuple[torch.Tensor, ...]], torch.Tensor],
    state: tuple[torch.Tensor, ...],
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Repeat `step` until every matrix's `drift` is at most SETTLED_DRIFT (checked every SETTLE_CHECK_EVERY steps:
    a check waits for the device) or SETTLE_MAX_STEPS, then POLISH_STEPS more steps (quadratic convergence
    takes a settled matrix to rounding). Returns the state and which matrices settled."""
    settled = torch.zeros(state[0].shape[:-2], dtype=torch.bool, device=state[0].device)
    for _ in range(0, SETTLE_MAX_STEPS, SETTLE_CHECK_EVERY):
        for _ in range(SETTLE_CHECK_EVERY):
            state = step(state)
        settled = drift(state) <= SETTLED_DRIFT
        if bool(settled.all()):
            break
    for _ in range(POLISH_STEPS):
        state = step(state)
    return state, settled


def _identity_on_nonzero(sizes: torch.Tensor) -> torch.Tensor:
    """diag(1 where `sizes` (..., k) is nonzero, 0 where it is zero): the identity on a batch's nonzero columns."""
    return torch.diag_embed((sizes != 0).to(sizes.dtype))


def _largest_eigenvalue_bound(symmetric: torch.Tensor) -> torch.Tensor:
    """An upper bound on each symmetric matrix's largest eigenvalue: its largest absolute row sum (Gershgorin)."""
    return symmetric.abs().sum(dim=-1).amax(dim=-1).clamp_min(torch.finfo(symmetric.dtype).tiny)


def host_is_faster(device: torch.device, size: int, batch: int, cores: int) -> bool:
    """Whether `batch` matrices of this size (the longer side) on `device` are solved clearly faster on `cores` host
    cores: the cores share the batch (batch / ⌈batch / cores⌉ at once) and must beat the host's cost per matrix."""
    if device.type != "cuda" or size <= DEVICE_BATCHED_MAX_SIZE or batch < 1:
        return False
    at_once = batch / math.ceil(batch / cores)
    return at_once >= HOST_MARGIN * HOST_COST_RATIO_AT_128 * size / 128


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def solve_in_chunks(solver: Solver, matrix: torch.Tensor, workers: int) -> tuple[torch.Tensor, ...]:
    """`solver` over a batch of CPU matrices cut into at most `workers` chunks solved at once, one thread each.
    LAPACK solves a batch one matrix at a time, so each matrix gets the result it gets alone."""
    flat = matrix.reshape(-1, *matrix.shape[-2:])
    chunks = torch.tensor_split(flat, max(1, min(workers, flat.shape[0])))
    with _one_thread_per_solve():
        parts = list(_thread_pool(workers).map(solver, chunks))
    return tuple(
        torch.cat(pieces).reshape(*matrix.shape[:-2], *pieces[0].shape[1:]) for pieces in zip(*parts, strict=True)
    )


def solve_on_host(solver: Solver, matrix: torch.Tensor, cores: int) -> tuple[torch.Tensor, ...]:
    """`solver` over a batch of matrices of any device, solved on `cores` host cores and returned to that device."""
    return tuple(result.to(matrix.device) for result in solve_in_chunks(solver, matrix.cpu(), cores))


def _solve(solver: Solver, matrix: torch.Tensor, batched_on_host: bool = False) -> tuple[torch.Tensor, ...]:
    """`solver` where it is fastest; with `batched_on_host`, also a CUDA batch cuSOLVER would batch on the host."""
    cores, size = usable_cores(), max(matrix.shape[-2:])
    batched = matrix.device.type == "cuda" and size <= DEVICE_BATCHED_MAX_SIZE
    if (batched and batched_on_host) or host_is_faster(matrix.device, size, math.prod(matrix.shape[:-2]), cores):
        return solve_on_host(solver, matrix, cores)
    return solver(matrix)


def _thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(matrix, full_matrices=False)


def _svd_polar(matrix: torch.Tensor) -> torch.Tensor:
    """P Qᵀ from the thin SVD P Σ Qᵀ (Procrustes)."""
    p, _, qh = svd(matrix)
    return matmul(p, qh)


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """The solving threads, kept for the process (called under _pool_lock)."""
    global _pool, _pool_workers
    if _pool is None or _pool_workers < workers:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ctm-linalg"), workers
    return _pool


def _forget_pool() -> None:
    """In a forked child the pool's threads are gone: the next batch starts a new pool."""
    global _pool, _pool_workers, _pool_lock
    _pool, _pool_workers, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


@contextmanager
def _one_thread_per_solve() -> Iterator[None]:
    """Each chunk's LAPACK call on one thread (the pool supplies the parallelism); one batch at a time."""
    with _pool_lock, one_torch_thread():
        yield
