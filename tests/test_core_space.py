"""Property tests of the core-space math and of CtM against formulas written here in float64."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import hosvd_energy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctm_cli import core_space as cs
from ctm_cli.methods import FactorGroup, MergeSettings, get_method
from ctm_cli.rules import get_rule

# CTM_TEST_DEVICE=cuda runs the math on the GPU (results must match the float64 references there too).
DEVICE = torch.device(os.environ.get("CTM_TEST_DEVICE", "cpu"))
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def factor_sets(draw: st.DrawFn, max_tasks: int = 4) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Random float64 LoRA factors of mixed ranks for T tasks, plus a seed used to draw them."""
    tasks = draw(st.integers(2, max_tasks))
    ranks = draw(st.lists(st.integers(1, 6), min_size=tasks, max_size=tasks))
    out_features = draw(st.integers(2, 48))
    in_features = draw(st.integers(2, 48))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    scales = rng.uniform(0.1, 3.0, size=tasks)
    b = [rng.standard_normal((out_features, r)) * s for r, s in zip(ranks, scales, strict=True)]
    a = [rng.standard_normal((r, in_features)) for r in ranks]
    return b, a, tasks


def _group(b: list[np.ndarray], a: list[np.ndarray]) -> FactorGroup:
    b_cat = torch.tensor(np.concatenate(b, axis=1), dtype=torch.float32, device=DEVICE).unsqueeze(0)
    a_cat = torch.tensor(np.concatenate(a, axis=0), dtype=torch.float32, device=DEVICE).unsqueeze(0)
    return FactorGroup(b_cat=b_cat, a_cat=a_cat, ranks=[x.shape[1] for x in b])


def _merge(group: FactorGroup, rank: int, beta: float = 1.0, weights: list[float] | None = None) -> np.ndarray:
    tasks = len(group.ranks)
    settings_ = MergeSettings(
        rank=rank,
        rule=get_rule("ta"),
        rule_params=get_rule("ta").resolve({"lambda": 1.0}),
        weights=torch.tensor(weights or [1.0] * tasks, dtype=torch.float64, device=DEVICE),
        beta=beta,
    )
    result = get_method("ctm").function(group, settings_)
    return (result.lora_b[0].double() @ result.lora_a[0].double()).cpu().numpy()


def _relative(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


@SETTINGS
@given(factor_sets())
def test_core_space_is_lossless(factors: tuple) -> None:
    b, a, _ = factors
    group = _group(b, a)
    space = cs.core_space(group.b_cat, group.a_cat, group.ranks)
    q_b = group.b_cat[0].double() @ space.left[0]
    q_a = group.a_cat[0].double().T @ space.right[0]
    for q in (q_b, q_a):  # orthonormal columns, plus zero columns where the factors are rank-deficient
        gram = (q.T @ q).cpu().numpy()
        assert np.allclose(gram, np.diag(np.round(np.diag(gram))), atol=1e-4)
    for t, (b_t, a_t) in enumerate(zip(b, a, strict=True)):
        rebuilt = (q_b @ space.cores[0, t] @ q_a.T).cpu().numpy()
        assert _relative(rebuilt, b_t @ a_t) < 1e-5


def test_core_space_handles_rank_deficient_inputs() -> None:
    rng = np.random.default_rng(1)
    b, a = rng.standard_normal((40, 4)), rng.standard_normal((4, 30))
    group = _group([b, b * 2.0, np.zeros((40, 3))], [a, a, rng.standard_normal((3, 30))])
    space = cs.core_space(group.b_cat, group.a_cat, group.ranks)
    q_b = group.b_cat[0].double() @ space.left[0]
    q_a = group.a_cat[0].double().T @ space.right[0]
    assert torch.isfinite(space.cores).all()
    assert _relative((q_b @ space.cores[0, 1] @ q_a.T).cpu().numpy(), 2.0 * b @ a) < 1e-5
    assert np.abs((q_b @ space.cores[0, 2] @ q_a.T).cpu().numpy()).max() < 1e-6


@SETTINGS
@given(factor_sets())
def test_factored_core_space_in_any_basis_is_lossless(factors: tuple) -> None:
    """The accelerator's bases (Newton–Schulz frames, forced here on the test device): each side's basis is
    orthonormal (zero columns where the eigh route took a rank-deficient side), spans the factors and rebuilds
    every ΔW_t."""
    b, a, _ = factors
    group = _group(b, a)
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(cs.small_linalg, "iterates_on", lambda device: True)
        space = cs.factored_core_space(group.b_cat, group.a_cat, group.ranks, any_basis=True)
    q_b = group.b_cat[0].double() @ space.left[0]
    q_a = group.a_cat[0].double().T @ space.right[0]
    for q in (q_b, q_a):
        gram = (q.T @ q).cpu().numpy()
        assert np.allclose(gram, np.diag(np.round(np.diag(gram))), atol=1e-4)
    cores = space.cores.dense()
    for t, (b_t, a_t) in enumerate(zip(b, a, strict=True)):
        assert _relative((q_b @ cores[0, t] @ q_a.T).cpu().numpy(), b_t @ a_t) < 1e-5


def test_symmetric_frame_takes_the_eigh_route_where_the_iteration_cannot_settle() -> None:
    """In one batch: a well-conditioned Gram gets G^-½ and G^½ (Q = X G^-½ orthonormal, Q G^½ = X); so does one of
    columns padded with zero columns, with zero columns of Q in their place; a singular one (a repeated column) gets
    the singular frame bit for bit, as alone."""
    generator = torch.Generator().manual_seed(12)
    columns = torch.randn(3, 30, 8, generator=generator, dtype=torch.float64)
    columns[1, :, 3] = columns[1, :, 0]
    columns[2, :, 5:] = 0
    grams = columns.mT @ columns
    to_basis, coordinates = cs._symmetric_frame(grams)
    for index, width in ((0, 8), (2, 5)):
        basis = columns[index] @ to_basis[index]
        identity = torch.diag(torch.tensor([1.0] * width + [0.0] * (8 - width), dtype=torch.float64))
        assert torch.allclose(basis.T @ basis, identity, atol=1e-12)
        assert torch.allclose(basis @ coordinates[index], columns[index], atol=1e-12)
    assert torch.allclose(to_basis[0], torch.linalg.inv(coordinates[0]), atol=1e-10)
    alone = cs._singular_frame(grams[1:2])
    assert torch.equal(to_basis[1], alone[0][0]) and torch.equal(coordinates[1], alone[1][0])


def test_gram_frame_on_the_cpu_keeps_the_singular_basis_in_any_case() -> None:
    gram = torch.randn(4, 9, 9, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    gram = gram @ gram.mT
    for got, want in zip(cs.gram_frame(gram, any_basis=True), cs._singular_frame(gram), strict=True):
        assert torch.equal(got, want)


@SETTINGS
@given(factor_sets(), st.integers(1, 4))
def test_hooi_never_keeps_less_than_hosvd(factors: tuple, rank: int) -> None:
    b, a, _ = factors
    group = _group(b, a)
    cores = cs.factored_core_space(group.b_cat, group.a_cat, group.ranks).cores
    rank = min(rank, sum(group.ranks))
    frame = cs.shared_frame_factored(cores, rank)
    assert float(frame.energy[0]) >= float(hosvd_energy(cores, rank)[0]) * (1 - 1e-12)
    assert float(frame.energy[0]) <= float(frame.total_energy[0]) * (1 + 1e-12)
    eye = torch.eye(rank, dtype=torch.float64, device=DEVICE)
    assert torch.allclose(frame.u[0].T @ frame.u[0], eye, atol=1e-10)
    assert torch.allclose(frame.v[0].T @ frame.v[0], eye, atol=1e-10)


@SETTINGS
@given(factor_sets(), st.floats(0.05, 20.0))
def test_beta_zero_frame_ignores_an_adapters_scale(factors: tuple, factor: float) -> None:
    b, a, _ = factors
    rank = 2
    cores = cs.factored_core_space(_group(b, a).b_cat, _group(b, a).a_cat, [x.shape[1] for x in b]).cores
    one_scaled = torch.ones_like(cores.scales)
    one_scaled[..., 0] = factor
    scaled = replace(cores, scales=cores.scales * one_scaled)
    frames = [cs.shared_frame_factored(cs.balance_factored(c, 0.0), rank) for c in (cores, scaled)]
    projector_u = [f.u[0] @ f.u[0].T for f in frames]
    projector_v = [f.v[0] @ f.v[0].T for f in frames]
    # HOOI stops at a 1e-10 relative energy gain: subspace angles are then ~sqrt(1e-10) = 1e-5.
    assert torch.allclose(projector_u[0], projector_u[1], atol=1e-4)
    assert torch.allclose(projector_v[0], projector_v[1], atol=1e-4)


@SETTINGS
@given(factor_sets(), st.integers(1, 8))
def test_ctm_output_rank_is_at_most_r(factors: tuple, rank: int) -> None:
    b, a, _ = factors
    group = _group(b, a)
    rank = min(rank, sum(group.ranks), *b[0].shape[:1], a[0].shape[1])
    merged = _merge(group, rank)
    singular = np.linalg.svd(merged, compute_uv=False)
    assert (singular[rank:] <= 1e-5 * singular[0]).all()


@SETTINGS
@given(factor_sets())
def test_ctm_at_full_rank_is_the_exact_sum(factors: tuple) -> None:
    b, a, _ = factors
    group = _group(b, a)
    exact = sum(b_t @ a_t for b_t, a_t in zip(b, a, strict=True))
    assert _relative(_merge(group, sum(group.ranks)), exact) < 1e-5


@SETTINGS
@given(factor_sets(), st.randoms(use_true_random=False))
def test_ctm_is_invariant_to_input_order(factors: tuple, random) -> None:
    b, a, tasks = factors
    order = list(range(tasks))
    random.shuffle(order)
    weights = [0.5 + t for t in range(tasks)]
    first = _merge(_group(b, a), 2, beta=0.5, weights=weights)
    shuffled = _merge(_group([b[i] for i in order], [a[i] for i in order]), 2, 0.5, [weights[i] for i in order])
    assert _relative(shuffled, first) < 1e-4


def test_batched_modules_equal_one_by_one() -> None:
    rng = np.random.default_rng(7)
    modules = [([rng.standard_normal((20, r)) for r in (3, 5)], [rng.standard_normal((r, 24)) for r in (3, 5)])]
    modules += [([rng.standard_normal((20, r)) for r in (3, 5)], [rng.standard_normal((r, 24)) for r in (3, 5)])]
    singles = [_merge(_group(b, a), 3) for b, a in modules]
    groups = [_group(b, a) for b, a in modules]
    stacked = FactorGroup(
        b_cat=torch.cat([g.b_cat for g in groups]), a_cat=torch.cat([g.a_cat for g in groups]), ranks=[3, 5]
    )
    settings_ = MergeSettings(
        rank=3,
        rule=get_rule("ta"),
        rule_params=get_rule("ta").resolve({"lambda": 1.0}),
        weights=torch.ones(2, dtype=torch.float64, device=DEVICE),
    )
    result = get_method("ctm").function(stacked, settings_)
    for index, single in enumerate(singles):
        batched = (result.lora_b[index].double() @ result.lora_a[index].double()).cpu().numpy()
        assert _relative(batched, single) < 1e-5


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
def test_balance_formula(beta: float) -> None:
    b, a = torch.randn(2, 20, 6, dtype=torch.float64), torch.randn(2, 6, 18, dtype=torch.float64)
    cores = cs.factored_core_space(b, a, [1, 2, 3]).cores
    norms = torch.linalg.matrix_norm(cores.dense())
    balanced = cs.balance_factored(cores, beta)
    expected = norms * beta + (1 - beta) * norms.mean(dim=1, keepdim=True)
    assert torch.allclose(torch.linalg.matrix_norm(balanced.dense()), expected)


def _random_factored_cores(seed: int, ranks: list[int], modules: int = 3) -> cs.FactoredCores:
    """Factored cores of `modules` modules with Gaussian factors of mixed scales and per-task scales of both signs;
    out and in exceed R, so the core space has no absent direction (where TSV's polar factors are not unique)."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(ranks)
    b = torch.randn(modules, total + 8, total, generator=generator, dtype=torch.float64)
    a = torch.randn(modules, total, total + 4, generator=generator, dtype=torch.float64)
    b = b * torch.rand(modules, 1, total, generator=generator, dtype=torch.float64).add(0.2)
    cores = cs.factored_core_space(b.to(DEVICE), a.to(DEVICE), ranks).cores
    signs = torch.tensor([(-1.0) ** t for t in range(len(ranks))], dtype=torch.float64, device=DEVICE)
    return replace(cores, scales=cores.scales * signs * torch.linspace(0.5, 2.0, len(ranks), device=DEVICE))


def _dense_of(form: cs.SvdForm) -> torch.Tensor:
    return (form.u * form.s.unsqueeze(-2)) @ form.v.mT


RANK_SETS = [[4, 4, 4], [6, 1, 3, 2], [12, 12, 12, 12], [16] * 8, [2, 9, 5]]


@pytest.mark.parametrize("ranks", RANK_SETS)
def test_task_svds_are_the_cores_svds(ranks: list[int]) -> None:
    """task_svds from the factors: U_t and V_t orthonormal on the task's nonzero singular values (columns past a
    task's rank r_t < ρ are zero or unit: their σ is 0), decreasing σ_t, U_t diag(σ_t) V_tᵀ = C_t, and σ_t the
    core's singular values (float64, to 1e-12)."""
    cores = _random_factored_cores(1, ranks)
    tasks = cores.task_svds()
    dense = cores.dense()
    assert torch.allclose(_dense_of(tasks), dense, atol=1e-12 * float(dense.abs().max()))
    present = (tasks.s > 1e-9 * tasks.s.amax(dim=-1, keepdim=True)).to(tasks.s.dtype)
    assert int(present.sum()) == cores.b.shape[0] * sum(ranks)  # every task's r_t directions
    for basis in (tasks.u, tasks.v):
        kept = basis * present.unsqueeze(-2)
        assert torch.allclose(kept.mT @ kept, torch.diag_embed(present), atol=1e-12)
        unused = basis.norm(dim=-2)[present == 0]
        assert ((unused < 1e-12) | ((unused - 1).abs() < 1e-12)).all()
    assert (tasks.s[..., :-1] >= tasks.s[..., 1:]).all()
    exact = torch.linalg.svdvals(dense)[..., : max(ranks)]
    assert torch.allclose(tasks.s, exact, atol=1e-12 * float(exact.max()))


@pytest.mark.parametrize("ranks", RANK_SETS)
@pytest.mark.parametrize("scale", [0.9, -1.3])
def test_factored_tsv_equals_tsv_of_the_dense_cores(ranks: list[int], scale: float) -> None:
    """TSV from the factors (left in SVD form) is TSV of the dense cores (float64, relative 1e-10), with weights and
    λ of both signs; its u and v have orthonormal columns where s is not zero (where it is, TSV's absent triplets,
    they are zero on an accelerator's route and the SVD's completion on the CPU's), so its singular values are
    |s|."""
    cores = _random_factored_cores(2, ranks)
    rule = get_rule("tsv")
    weights = torch.linspace(0.5, 1.5, len(ranks), dtype=torch.float64, device=DEVICE)
    params = rule.resolve({"lambda": scale})
    form = rule.factored(cores, weights, params)
    want = rule.function(cores.dense(), weights, params, None)
    assert torch.linalg.matrix_norm(_dense_of(form) - want).max() <= 1e-10 * torch.linalg.matrix_norm(want).min()
    present = (form.s != 0).to(torch.float64)
    for basis in (form.u, form.v):
        kept = basis * present.unsqueeze(-2)
        assert torch.allclose(kept.mT @ kept, torch.diag_embed(present), atol=1e-12)
        unused = basis.norm(dim=-2)[present == 0]
        assert ((unused < 1e-12) | ((unused - 1).abs() < 1e-12)).all()
    exact = torch.linalg.svdvals(want)[..., : form.s.shape[-1]]
    assert torch.allclose(form.s.abs().sort(dim=-1, descending=True).values, exact, atol=1e-10 * float(exact.max()))


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_truncate_svd_form_is_truncate_of_the_matrix(rank: int) -> None:
    """Cutting u·diag(s)·vᵀ (s unsorted, signed) from its SVD form gives truncate's ΔW, lost energy and bases (up to
    the sign of each pair of vectors), with maps on both sides and with a spectrum that flips a sign."""
    generator = torch.Generator().manual_seed(rank)
    u = torch.linalg.qr(torch.randn(2, 20, 12, generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(2, 16, 12, generator=generator, dtype=torch.float64))[0]
    s = torch.randn(2, 12, generator=generator, dtype=torch.float64) * 3
    left, right = (torch.randn(2, size, size, generator=generator, dtype=torch.float64) for size in (20, 16))
    form = cs.SvdForm(u, s, v)
    for spectrum in (None, lambda kept: -0.5 * kept):
        fast = cs.truncate_svd_form(form, rank, left, right, spectrum)
        slow = cs.truncate(_dense_of(form), rank, left, right, spectrum)
        assert torch.allclose(fast.to_b @ fast.to_a, slow.to_b @ slow.to_a, atol=1e-12)
        assert torch.allclose(fast.lost_energy, slow.lost_energy, atol=1e-14)
        for found, want in ((fast.left_basis, slow.left_basis), (fast.right_basis, slow.right_basis)):
            assert torch.allclose((found * want).sum(dim=-2).abs(), torch.ones(2, rank, dtype=torch.float64))


@pytest.mark.parametrize("rule", ["tsv", "ta", "mean", "iso_c", "ties", "magnitude_prune"])
@pytest.mark.parametrize("isotropic", [False, True])
def test_merge_and_cut_factored_is_merge_and_cut_of_the_dense_cores(rule: str, isotropic: bool) -> None:
    """The factored route (tsv's SVD form, Σ c_t C_t for linear and spectral rules, the dense stack for the others)
    gives merge_and_cut's result on the dense cores: the same ΔW in float64 (relative 1e-10) and lost energy."""
    from ctm_cli.methods.common import merge_and_cut, merge_and_cut_factored

    cores = _random_factored_cores(3, [6, 1, 3, 2])
    left = torch.linalg.qr(torch.randn(3, 40, 12, dtype=torch.float64, device=DEVICE))[0]  # a map to out = 40
    spec = get_rule(rule)
    settings_ = MergeSettings(
        rank=4,
        rule=spec,
        rule_params=spec.resolve({}),
        weights=torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64, device=DEVICE),
    )
    fast = merge_and_cut_factored(cores, settings_, left, None, isotropic)
    slow = merge_and_cut(cores.dense(), settings_, left, None, isotropic)
    want = slow.to_b @ slow.to_a
    assert torch.linalg.matrix_norm(fast.to_b @ fast.to_a - want).max() <= 1e-10 * torch.linalg.matrix_norm(want).min()
    assert torch.allclose(fast.lost_energy, slow.lost_energy, atol=1e-12)


@pytest.mark.parametrize("factor", [1e200, 1e-200])
def test_task_svds_hold_extreme_scales(factor: float) -> None:
    """Task scales whose squares overflow or underflow float64 (weights of 1e200 or 1e-200) give the same SVDs,
    scaled: the Gram matrices are taken of unit-scaled columns."""
    cores = _random_factored_cores(3, [4, 6, 2])
    extreme = replace(cores, scales=cores.scales * factor).task_svds()
    plain = cores.task_svds()
    assert torch.allclose(extreme.s / factor, plain.s, rtol=1e-10, atol=0)
    assert torch.allclose(_dense_of(extreme) / factor, _dense_of(plain), atol=1e-12 * float(plain.s.max()))
