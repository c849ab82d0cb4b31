"""Arithmetic whose rounding does not depend on which modules share a batch (the --max-memory grouping into
waves and groups, HOOI dropping the modules that stopped) nor on the number of threads, so that a recipe
repeats a CPU merge bit for bit.

A multithreaded CPU BLAS splits the work of one matrix product between threads in ways that depend on the
batch size and the thread count (a lone matrix gets all threads, a contraction of 1024 is summed in parts;
in a batch each matrix gets one thread, or a few when the batch is small), and every split sums in another
order. On one thread every matrix of a batch is computed exactly as it would be alone, except that a lone
product with a one-column right factor takes the matrix-vector path; `matmul` pads that column; and MKL, unless its
strict reproducibility mode is on (ctm_cli/__init__.py turns it on), rounds by where the output lies in memory. The
merge's math therefore runs on one CPU thread (`single_threaded`). On CUDA, cuBLAS and cuSOLVER also choose their
kernels by batch size; nothing here changes that (README, "Reproducibility").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def matmul(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right, computed on the CPU the same way for a lone matrix as for each matrix of a batch."""
    if right.shape[-1] != 1 or left.device.type != "cpu":
        return left @ right
    return (left @ torch.cat([right, torch.zeros_like(right)], dim=-1))[..., :1]


@contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """Run the enclosed CPU math on one thread (see the module doc); on other devices nothing changes."""
    if device.type != "cpu":
        yield
        return
    with one_torch_thread():
        yield


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch's CPU operations on one thread for the enclosed code, the previous count restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
