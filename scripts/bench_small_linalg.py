"""Batches of small SVDs and eighs: cuSOLVER's batch on the GPU against the same batch solved on the host's cores
(`ctm_cli.small_linalg.solve_in_chunks`: one chunk per core, one LAPACK thread each), and what `small_linalg`
chooses. The figures behind small_linalg's cost estimate (docs/benchmarks.md). Then the two Newton–Schulz
routes a GPU takes instead, against the solver routes in the same run: polar factors (`small_linalg.polar` against
the SVD's, `_svd_polar`) and core-space frames from Gram matrices (`core_space._symmetric_frame` against the
eigh's, `_singular_frame`), with how far apart their results are. Needs a CUDA device."""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch

from ctm_cli import core_space, small_linalg

SHAPES = "224x128,64x128,8x128,64x256,8x512,2x1024,1x1600,7x1600"


def _thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.linalg.svd(matrix, full_matrices=False)


def _milliseconds(work: Callable[[], object], repeats: int) -> float:
    """Best wall time of `work` in ms, the device synchronised, after one untimed call."""
    work()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    """Time every batch × size of --shapes, SVD in float32 and eigh in float64, on the GPU and on the host."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated BATCHxSIZE")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_small_linalg: needs a CUDA device")
    cores = small_linalg.usable_cores()
    print(f"{torch.cuda.get_device_name()}, {cores} host cores, torch {torch.__version__}")
    print("problem  batch  size  GPU ms  host ms  GPU/host  small_linalg picks")
    for item in args.shapes.split(","):
        batch, size = (int(part) for part in item.split("x"))
        matrix = torch.randn(batch, size, size, device="cuda")
        gram = (matrix @ matrix.mT).double()
        for name, solver, operand in (
            ("svd f32", _thin_svd, matrix),
            ("eigh f64", torch.linalg.eigh, gram),
        ):
            on_gpu = _milliseconds(functools.partial(solver, operand), args.repeats)
            on_host = _milliseconds(functools.partial(small_linalg.solve_on_host, solver, operand, cores), args.repeats)
            pick = "host" if small_linalg.host_is_faster(operand.device, size, batch, cores) else "GPU"
            print(f"{name:8} {batch:5} {size:5} {on_gpu:7.1f} {on_host:8.1f} {on_gpu / on_host:8.2f}×  {pick}")
    print("\nproblem    batch  size  solver route ms  Newton–Schulz ms  speed-up  max |difference|")
    for item in args.shapes.split(","):
        batch, size = (int(part) for part in item.split("x"))
        for row in newton_schulz_rows(batch, size, args.repeats):
            print(row)


def newton_schulz_rows(batch: int, size: int, repeats: int) -> list[str]:
    """One line per Newton–Schulz route on a batch of float64 matrices of condition ~`size`: polar factors of
    Gaussian matrices, and the frames of their Gram matrices (`max |difference|`: of the polar factors; of the
    reconstructed Gram matrices Kᵀ K, which any orthonormal frame gives alike)."""
    matrix = torch.randn(batch, size, size, device="cuda", dtype=torch.float64)
    gram = matrix.mT @ matrix
    rows = []
    for name, operand, solver_route, iteration, compare in (
        ("polar", matrix, small_linalg._svd_polar, small_linalg.polar, lambda x: x),
        ("frame", gram, core_space._singular_frame, core_space._symmetric_frame, lambda f: f[1].mT @ f[1]),
    ):
        solved = _milliseconds(functools.partial(solver_route, operand), repeats)
        iterated = _milliseconds(functools.partial(iteration, operand), repeats)
        reference = compare(solver_route(operand))
        difference = (reference - compare(iteration(operand))).abs().max().item()
        rows.append(
            f"{name} f64  {batch:5} {size:5} {solved:16.1f} {iterated:17.2f} {solved / iterated:8.1f}×"
            f"  {difference / reference.abs().max().item():.1e} (relative)"
        )
    return rows


if __name__ == "__main__":
    main()
