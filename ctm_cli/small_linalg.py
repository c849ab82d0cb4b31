"""Batches of small SVDs and symmetric eigendecompositions, solved where they are fastest.

cuSOLVER batches these only up to 32 × 32 and solves larger matrices one at a time, each call bound by its
latency: about 2.5 ms per 128 × 128 SVD and 1.5 ms per eigh on an H200, so the few hundred modules of a wave
spend seconds there. LAPACK on the host takes a little longer per matrix on one core, but a batch spreads over
the cores: a batch of CUDA matrices is solved on the host, cut into one chunk per core, each chunk on one thread,
where that is estimated to be clearly faster (`host_is_faster`: 6–15× on 16 cores for a wave of 128 × 128
matrices; docs/benchmarks.md). CPU tensors, matrices cuSOLVER batches, and the rest are solved where they are.
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

from ctm_cli.fixed_order import one_torch_thread

# cuSOLVER's batched Jacobi solvers take matrices up to this size on a side: those stay on the device, but eigh's
# (see `eigh`).
DEVICE_BATCHED_MAX_SIZE = 32
# One n × n matrix (n the longer side) costs LAPACK on one host core about this many times, times n / 128, what it
# costs cuSOLVER's one-matrix loop (measured on an H200 host: SVD 1.5 at 128, 3 at 256 and 512, 6 at 1024; eigh
# in float64 1.2, 4.9 and 7.4 at 128, 256 and 512).
HOST_COST_RATIO_AT_128 = 1.5
# The host is chosen only where the estimate makes it at least this many times faster (transfers, threads).
HOST_MARGIN = 2.0

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
