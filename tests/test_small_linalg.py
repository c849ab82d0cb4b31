"""small_linalg: batches of small SVDs/eighs cut into chunks on host threads give each matrix the result it gets
alone, and the router keeps on the device what the device does best. CTM_TEST_DEVICE=cuda checks the host route
of CUDA tensors against float64 references."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctm_cli import small_linalg
from ctm_cli.small_linalg import DEVICE_BATCHED_MAX_SIZE, host_is_faster

DEVICE = torch.device(os.environ.get("CTM_TEST_DEVICE", "cpu"))


def _symmetric(*shape: int, seed: int) -> torch.Tensor:
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return matrix @ matrix.mT


@settings(max_examples=25, deadline=None)
@given(
    leading=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    rows=st.integers(1, 9),
    columns=st.integers(1, 9),
    workers=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_chunked_svd_equals_the_batch_solved_at_once(leading, rows, columns, workers, seed):
    matrix = torch.randn(*leading, rows, columns, generator=torch.Generator().manual_seed(seed))
    expected = torch.linalg.svd(matrix, full_matrices=False)
    chunked = small_linalg.solve_in_chunks(small_linalg._thin_svd, matrix, workers)
    for got, want in zip(chunked, expected, strict=True):
        assert got.shape == want.shape
        assert torch.equal(got, want)


@pytest.mark.parametrize("workers", [1, 3, 16])
def test_chunked_eigh_equals_the_batch_solved_at_once_and_restores_threads(workers):
    matrix = _symmetric(2, 5, 40, 40, seed=workers)
    threads = torch.get_num_threads()
    values, vectors = small_linalg.solve_in_chunks(torch.linalg.eigh, matrix, workers)
    assert torch.get_num_threads() == threads
    want_values, want_vectors = torch.linalg.eigh(matrix)
    assert torch.equal(values, want_values) and torch.equal(vectors, want_vectors)


def test_cpu_tensors_are_solved_as_torch_solves_them():
    matrix = torch.randn(7, 64, 48, generator=torch.Generator().manual_seed(1))
    for got, want in zip(small_linalg.svd(matrix), torch.linalg.svd(matrix, full_matrices=False), strict=True):
        assert torch.equal(got, want)
    gram = _symmetric(3, 64, 64, seed=2)
    for got, want in zip(small_linalg.eigh(gram), torch.linalg.eigh(gram), strict=True):
        assert torch.equal(got, want)


def test_router_sends_to_the_host_only_batches_the_cores_share_well():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert host_is_faster(cuda, 128, batch=224, cores=16)  # a wave of a T = 8 merge on an H200 host
    assert host_is_faster(cuda, 128, batch=8, cores=4)
    assert host_is_faster(cuda, 512, batch=64, cores=16)
    assert not host_is_faster(cuda, DEVICE_BATCHED_MAX_SIZE, batch=224, cores=16)  # cuSOLVER's batched Jacobi
    assert not host_is_faster(cuda, 512, batch=2, cores=16)  # two large matrices: two cores cannot beat the GPU
    assert not host_is_faster(cuda, 1600, batch=64, cores=16)
    assert not host_is_faster(cuda, 128, batch=224, cores=2)  # too few cores
    assert not host_is_faster(cuda, 128, batch=0, cores=16)
    assert not host_is_faster(cpu, 128, batch=224, cores=16)  # already on the host: solved as it is


@pytest.mark.parametrize("size", [16, 128])
def test_svd_and_eigh_match_float64_on_the_test_device(size):
    matrix = torch.randn(6, size, size // 2, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
    u, s, vh = small_linalg.svd(matrix.to(DEVICE, torch.float32))
    assert u.device.type == DEVICE.type and s.device.type == DEVICE.type
    rebuilt = ((u * s.unsqueeze(-2)) @ vh).cpu().double()
    assert torch.linalg.matrix_norm(rebuilt - matrix).max() <= 1e-5 * torch.linalg.matrix_norm(matrix).max()
    assert torch.allclose(s.cpu().double(), torch.linalg.svdvals(matrix), rtol=1e-5, atol=1e-5)
    gram = _symmetric(4, size, size, seed=size)
    values, vectors = small_linalg.eigh(gram.to(DEVICE))
    assert values.device.type == DEVICE.type
    rebuilt_gram = (vectors * values.unsqueeze(-2)) @ vectors.mT
    assert torch.allclose(rebuilt_gram.cpu(), gram, rtol=0, atol=1e-10 * gram.abs().max().item())
    assert torch.all(values[..., 1:] >= values[..., :-1])


def test_solving_on_the_host_returns_what_torch_gives_on_the_cpu():
    """The host route of any solver (here a QR, as the router would send one) gives torch's own results."""
    matrix = torch.randn(3, 8, 128, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for got, want in zip(small_linalg.solve_on_host(torch.linalg.qr, matrix, 4), torch.linalg.qr(matrix), strict=True):
        assert torch.equal(got, want)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_solves_in_chunks_after_its_parent_did():
    matrix = torch.randn(6, 8, 8, generator=torch.Generator().manual_seed(4))
    small_linalg.solve_in_chunks(torch.linalg.qr, matrix, 3)  # the parent's pool has threads now
    child = os.fork()
    if child == 0:  # the child's pool must not wait for threads it does not have (the alarm ends a hang)
        signal.alarm(30)
        q, r = small_linalg.solve_in_chunks(torch.linalg.qr, matrix, 3)
        os._exit(0 if torch.allclose(q @ r, matrix, atol=1e-5) else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(DEVICE.type != "cuda", reason="cuSOLVER's workspace exists on a GPU only (CTM_TEST_DEVICE=cuda)")
def test_small_eighs_take_no_device_workspace():
    """A CUDA batch of small eighs is solved on the host: no batched Jacobi workspace (0.6 MiB a matrix) on the
    device, only the results; the same eigenvalues as cuSOLVER's."""
    gram = torch.randn(64, 16, 16, dtype=torch.float64, device=DEVICE)
    gram = gram @ gram.mT
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    values, vectors = small_linalg.eigh(gram)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= 4 * (values.nbytes + vectors.nbytes)
    assert values.device == gram.device and torch.allclose(values, torch.linalg.eigvalsh(gram), rtol=1e-10)


def _conditioned(batch: int, rows: int, columns: int, condition: float, seed: int) -> torch.Tensor:
    """Random float64 matrices with singular values spread geometrically from 1 down to 1 / condition."""
    generator = torch.Generator().manual_seed(seed)
    size = min(rows, columns)
    left = torch.linalg.qr(torch.randn(batch, rows, size, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(batch, columns, size, generator=generator, dtype=torch.float64))[0]
    values = torch.logspace(0, -math.log10(condition), size, dtype=torch.float64) if size > 1 else torch.ones(1)
    return (left * values.to(torch.float64)) @ right.mT


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    rows=st.integers(1, 40),
    columns=st.integers(1, 40),
    condition=st.sampled_from([1.0, 10.0, 1e4, 1e7]),
    seed=st.integers(0, 2**16),
)
def test_polar_by_iteration_equals_the_svd_polar(batch, rows, columns, condition, seed):
    """Tall, wide and square matrices of condition up to 1e7: the iteration settles on the SVD's polar factor."""
    matrix = _conditioned(batch, rows, columns, condition, seed)
    expected = small_linalg._svd_polar(matrix)
    got = small_linalg.polar_by_iteration(matrix)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-13 * condition * max(rows, columns)


def test_polar_by_iteration_hands_unsettled_matrices_to_the_svd():
    """Rank-deficient (a repeated column, a repeated column beside a zero one), non-finite and extremely
    ill-conditioned matrices do not settle; each gets the SVD's polar factor bit for bit, and the batch's settled
    matrices keep theirs."""
    well = _conditioned(3, 24, 12, 10.0, seed=5)
    repeated = well[0].clone()
    repeated[:, 1] = repeated[:, 0]
    repeated_and_zero = repeated.clone()
    repeated_and_zero[:, 5] = 0
    extreme = _conditioned(1, 24, 12, 1e14, seed=6)[0]
    batch = torch.stack([well[0], repeated, repeated_and_zero, well[1], extreme, well[2]])
    _, settled = small_linalg.newton_schulz_polar(batch)
    assert settled.tolist() == [True, False, False, True, False, True]
    got = small_linalg.polar_by_iteration(batch)
    for index in (1, 2, 4):
        assert torch.equal(got[index], small_linalg._svd_polar(batch[index : index + 1])[0])
    assert torch.allclose(got[[0, 3, 5]], small_linalg._svd_polar(well), rtol=0, atol=1e-12)
    with_nan = well.clone()
    with_nan[1, 0, 0] = float("nan")
    assert small_linalg.newton_schulz_polar(with_nan)[1].tolist() == [True, False, True]


@pytest.mark.parametrize("zero_columns", [[0], [3, 7, 8], list(range(12))])
@pytest.mark.parametrize("wide", [False, True])
def test_zero_columns_stay_zero_and_the_rest_gets_its_polar_factor(zero_columns: list[int], wide: bool):
    """Columns (rows, if wide) that are exactly zero, as TSV's absent triplets are, stay zero and do not keep the
    matrix from settling; the other columns get the polar factor of those columns alone, as the SVD gives it."""
    matrix = _conditioned(2, 24, 12, 100.0, seed=12)
    matrix[:, :, zero_columns] = 0
    kept = [column for column in range(12) if column not in zero_columns]
    got = small_linalg.polar_by_iteration(matrix.mT if wide else matrix)
    got = got.mT if wide else got
    assert small_linalg.newton_schulz_polar(matrix)[1].all()
    assert torch.equal(got[:, :, zero_columns], torch.zeros_like(got[:, :, zero_columns]))
    if kept:
        assert torch.allclose(got[:, :, kept], small_linalg._svd_polar(matrix[:, :, kept]), rtol=0, atol=1e-12)


def test_polar_on_the_cpu_is_the_svd_polar():
    matrix = torch.randn(5, 30, 20, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.equal(small_linalg.polar(matrix), small_linalg._svd_polar(matrix))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 128, 128), (3, 40, 16), (2, 16, 40)])
def test_polar_matches_float64_on_the_test_device(dtype, shape):
    """`polar` where the test device puts it (CUDA: Newton–Schulz) against LAPACK's in float64."""
    matrix = _conditioned(shape[0], shape[1], shape[2], 100.0, seed=shape[1])
    got = small_linalg.polar(matrix.to(DEVICE, dtype))
    assert got.device.type == DEVICE.type and got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert (got.cpu().double() - small_linalg._svd_polar(matrix)).abs().max() <= tolerance


@pytest.mark.parametrize("condition", [1.0, 1e4, 1e8])
def test_square_roots_settle_on_positive_definite_matrices(condition):
    """G^½ squares back to G and G^-½ inverts it, to the precision the condition number allows."""
    half = _conditioned(5, 20, 20, math.sqrt(condition), seed=8)
    gram = half.mT @ half
    root, inverse, settled = small_linalg.square_roots(gram, condition_limit=1e10)
    assert settled.all()
    scale = torch.linalg.matrix_norm(gram, ord=2)
    assert (torch.linalg.matrix_norm(root @ root - gram) / scale).max() <= 1e-13 * condition
    eye = torch.eye(20, dtype=torch.float64)
    assert (inverse @ root - eye).abs().max() <= 1e-14 * condition
    for matrix in (root, inverse):  # symmetric as G is, to the same precision
        assert (matrix - matrix.mT).abs().max() <= 1e-15 * condition * matrix.abs().max()


def test_square_roots_leave_singular_and_too_ill_conditioned_matrices_unsettled():
    """A rank-deficient G never settles; one that settles but whose condition number exceeds the limit is reported
    unsettled too; a zero G settles, to zero roots."""
    well = _conditioned(1, 12, 12, 10.0, seed=9)[0]
    deficient = _conditioned(1, 12, 6, 10.0, seed=10)[0]
    ill = _conditioned(1, 12, 12, 1e4, seed=11)[0]
    grams = torch.stack([m @ m.mT for m in (well, deficient, torch.zeros(12, 12), ill)])
    root, inverse, settled = small_linalg.square_roots(grams, condition_limit=1e10)
    assert settled.tolist() == [True, False, True, True]
    assert not root[2].any() and not inverse[2].any()
    assert small_linalg.square_roots(grams, condition_limit=1e6)[2].tolist() == [True, False, True, False]


def test_square_roots_of_a_padded_gram_are_the_blocks_beside_zeros():
    """The Gram matrix of columns padded with zero ones (zero rows and columns in G) settles: its roots are those of
    the nonzero block, with zeros where G is zero."""
    half = _conditioned(3, 16, 9, 30.0, seed=13)
    padded = torch.cat([half[..., :4], torch.zeros(3, 16, 2, dtype=half.dtype), half[..., 4:]], dim=-1)
    root, inverse, settled = small_linalg.square_roots(padded.mT @ padded, condition_limit=1e10)
    block_root, block_inverse, block_settled = small_linalg.square_roots(half.mT @ half, condition_limit=1e10)
    assert settled.all() and block_settled.all()
    kept = [*range(4), *range(6, 11)]
    for got, block in ((root, block_root), (inverse, block_inverse)):
        assert not got[:, 4:6].any() and not got[:, :, 4:6].any()
        assert torch.allclose(got[:, kept][:, :, kept], block, rtol=0, atol=1e-12 * block.abs().max())


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(2, 30),
    columns=st.integers(1, 30),
    condition=st.sampled_from([1.0, 100.0, 1e5]),
    seed=st.integers(0, 2**16),
)
def test_polar_by_iteration_commutes_with_permutations_and_has_orthonormal_columns(rows, columns, condition, seed):
    """polar(X P) = polar(X) P for a permutation P of the columns (and of the rows: P polar(X)); the factor's
    columns (rows, if wide) are orthonormal."""
    matrix = _conditioned(1, rows, columns, condition, seed)[0]
    order = torch.randperm(columns, generator=torch.Generator().manual_seed(seed))
    lines = torch.randperm(rows, generator=torch.Generator().manual_seed(seed + 1))
    factor = small_linalg.polar_by_iteration(matrix)
    tolerance = 1e-13 * condition * max(rows, columns)
    assert (small_linalg.polar_by_iteration(matrix[:, order]) - factor[:, order]).abs().max() <= tolerance
    assert (small_linalg.polar_by_iteration(matrix[lines]) - factor[lines]).abs().max() <= tolerance
    small = factor if rows >= columns else factor.mT
    eye = torch.eye(small.shape[-1], dtype=torch.float64)
    assert (small.mT @ small - eye).abs().max() <= 1e-12
