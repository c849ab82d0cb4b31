"""The diagnosis figures (ctm_cli/diagnostics.py) against float64 references written from their definitions
(tests/diagnostics_reference.py), on adapters of known structure, and their invariances."""

from __future__ import annotations

import os

import diagnostics_reference as dref
import merge_reference as ref
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import balance, hooi
from reference import core_space as qr_core_space

from ctm_cli import diagnostics as dg
from ctm_cli.methods import FactorGroup, MergeSettings, get_method, resolve_settings
from ctm_cli.rules import get_rule

DEVICE = torch.device(os.environ.get("CTM_TEST_DEVICE", "cpu"))
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RULE_PARAMS = {
    "tsv": {"lambda": 0.9},
    "ta": {"lambda": 0.7},
    "ties": {"density": 0.3, "lambda": 0.8},
    "dare": {"drop_rate": 0.5},
    "magnitude_prune": {"density": 0.3},
    "iso_c": {},
}
SEED = 5


def _factors(ranks: list[int], out: int, inp: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.3, 3.0, size=len(ranks))
    bs = [rng.standard_normal((out, r)) * s for r, s in zip(ranks, scales, strict=True)]
    return bs, [rng.standard_normal((r, inp)) for r in ranks]


@st.composite
def factor_sets(draw: st.DrawFn, max_tasks: int = 4) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random float64 factors of mixed ranks, with out, in ≥ R (full-rank core spaces)."""
    tasks = draw(st.integers(2, max_tasks))
    ranks = draw(st.lists(st.integers(1, 4), min_size=tasks, max_size=tasks))
    total = sum(ranks)
    out, inp = draw(st.integers(total, total + 12)), draw(st.integers(total, total + 12))
    return _factors(ranks, out, inp, draw(st.integers(0, 2**31)))


def _tensor(matrices: list[np.ndarray], axis: int) -> torch.Tensor:
    return torch.tensor(np.concatenate(matrices, axis=axis), dtype=torch.float64, device=DEVICE).unsqueeze(0)


def _rule_params(rule: str) -> dict[str, float]:
    return get_rule(rule).resolve(RULE_PARAMS[rule])


def _diagnose(bs, as_, rule: str = "tsv", weights=None, frame_rank: int = 0, beta: float = 1.0) -> dg.Diagnosis:
    tasks = len(bs)
    return dg.diagnose(
        _tensor(bs, 1),
        _tensor(as_, 0),
        [b.shape[1] for b in bs],
        get_rule(rule),
        torch.tensor(weights or [1.0] * tasks, dtype=torch.float64, device=DEVICE),
        _rule_params(rule),
        frame_rank=frame_rank,
        beta=beta,
        generator=torch.Generator().manual_seed(SEED),
    )


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _shares(diagnosis: dg.Diagnosis) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(conflict share per task, energy curve, per-task kept share) of module 0."""
    conflict = _numpy(diagnosis.conflict.against[0] / diagnosis.conflict.energy[0])
    curve = _numpy(dg.energy_curve(diagnosis.merge_energies)[0])
    kept = _numpy(diagnosis.task_kept[0] / diagnosis.norms[0].square().unsqueeze(-1))
    return conflict, curve, kept


# ------------------------------------------------------------------------------------- against the references


@SETTINGS
@given(factor_sets())
def test_figures_match_reference(factors: tuple) -> None:
    bs, as_ = factors
    diagnosis = _diagnose(bs, as_)
    deltas = ref.updates(bs, as_)
    assert np.allclose(_numpy(diagnosis.column_overlap[0]), dref.overlap(bs), atol=1e-9)
    assert np.allclose(_numpy(diagnosis.row_overlap[0]), dref.overlap([a.T for a in as_]), atol=1e-9)
    assert np.allclose(_numpy(dg.update_cosines(diagnosis.inner_products)[0]), dref.cosines(deltas), atol=1e-9)
    norms = _numpy(dg.relative_norms(diagnosis.norms)[0])
    assert np.allclose(norms, dref.relative_norms(deltas), rtol=1e-9)
    against, energy = dref.conflict(dref.whole_frame_coordinates(bs, as_), [1.0] * len(bs))
    assert np.allclose(_numpy(diagnosis.conflict.against[0]), against, rtol=1e-7, atol=1e-9 * energy.sum())
    assert np.allclose(_numpy(diagnosis.conflict.energy[0]), energy, rtol=1e-9)


@pytest.mark.parametrize("rule", sorted(RULE_PARAMS))
@pytest.mark.parametrize("seed", [1, 2])
def test_energy_curves_match_reference(rule: str, seed: int) -> None:
    bs, as_ = _factors([3, 2, 4], 14, 12, seed)
    weights = [1.0, 0.5, 2.0]
    diagnosis = _diagnose(bs, as_, rule, weights)
    coordinates = dref.whole_frame_coordinates(bs, as_)
    uniform = ref.draws((len(bs), 9, 9), SEED) if rule == "dare" else None
    merged = ref.apply_rule(rule, coordinates, weights, _rule_params(rule), uniform)
    _, curve, kept = _shares(diagnosis)
    assert np.allclose(curve, dref.curve(merged), atol=1e-9)
    if not get_rule(rule).spectral:  # a flat spectrum leaves the rank-r spaces undefined
        norms = np.array([np.sum(d**2) for d in ref.updates(bs, as_)])
        assert np.allclose(kept, dref.task_kept(merged, coordinates) / norms[:, None], atol=1e-9)


def test_conflict_in_a_hooi_frame_matches_reference() -> None:
    bs, as_ = _factors([3, 2, 4], 14, 12, 3)
    weights, rank, beta = [1.0, 0.5, 2.0], 4, 0.5
    diagnosis = _diagnose(bs, as_, "ties", weights, frame_rank=rank, beta=beta)
    space = qr_core_space(as_, bs, [1.0] * len(bs))
    frame = hooi(balance(space.cores, beta), rank)
    coordinates = [frame.u.T @ c @ frame.v for c in space.cores]  # u, v: eigenvectors, unique up to their signs
    against, energy = dref.conflict(coordinates, weights)
    assert np.allclose(_numpy(diagnosis.conflict.energy[0]), energy, rtol=1e-6)
    assert np.allclose(_numpy(diagnosis.conflict.against[0]), against, rtol=1e-5, atol=1e-8 * energy.sum())
    whole = np.array([w**2 * np.sum(d**2) for w, d in zip(weights, ref.updates(bs, as_), strict=True)])
    assert (energy < whole).all()  # the frame misses some


@pytest.mark.parametrize("rule", ["tsv", "ta", "ties"])
def test_curve_is_what_the_default_merge_keeps(rule: str) -> None:
    """1 − curve[r−1] is ctm's truncation loss at rank r (default frame), and the per-task shares its kept_energy."""
    bs, as_ = _factors([3, 3, 3], 16, 13, 4)
    weights = [1.0, 0.5, 2.0]
    diagnosis = _diagnose(bs, as_, rule, weights)
    _, curve, kept = _shares(diagnosis)
    group = FactorGroup(b_cat=_tensor(bs, 1), a_cat=_tensor(as_, 0), ranks=[3, 3, 3])
    method = get_method("ctm")
    method_params, rule_params = resolve_settings(method, get_rule(rule), RULE_PARAMS[rule])
    for rank in range(1, 10):
        merge = MergeSettings(
            rank, get_rule(rule), rule_params, torch.tensor(weights, dtype=torch.float64), method_params=method_params
        )
        result = method.function(group, merge)
        assert abs(curve[rank - 1] - (1 - float(result.truncation_loss[0]))) < 1e-9
        # past the merged matrix's rank too: the output's spaces are those of its nonzero singular values
        assert np.allclose(kept[:, rank - 1], _numpy(result.kept_energy[0]), atol=1e-9)


@pytest.mark.parametrize("rule", ["tsv", "ta", "iso_c"])
def test_curve_is_merge_then_compress_with_equal_ranks(rule: str) -> None:
    """With every r_t ≤ R / T, TSV on the full updates keeps every triplet, as in core space: one curve."""
    bs, as_ = _factors([2, 2, 2, 2], 15, 11, 6)
    weights = [1.0, 0.5, 2.0, 1.5]
    _, curve, _ = _shares(_diagnose(bs, as_, rule, weights))
    full = ref.apply_rule(rule, ref.updates(bs, as_), weights, _rule_params(rule))
    assert np.allclose(curve, dref.curve(full)[: len(curve)], atol=1e-9)


# ---------------------------------------------------------------------------------------- known structure


def _orthonormal(rows: int, columns: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, columns)))[0]


def test_identical_adapters_overlap_fully_and_never_conflict() -> None:
    """B_t = c_t B O_t, A_t = O_tᵀ A: the same update up to a positive scale, in rotated factors."""
    rng = np.random.default_rng(8)
    b, a = rng.standard_normal((20, 4)), rng.standard_normal((4, 17))
    scales = [1.0, 2.5, 0.4]
    rotations = [_orthonormal(4, 4, seed) for seed in range(3)]
    bs = [c * b @ o for c, o in zip(scales, rotations, strict=True)]
    diagnosis = _diagnose(bs, [o.T @ a for o in rotations], "ties")
    ones = np.ones((3, 3))
    assert np.allclose(_numpy(diagnosis.column_overlap[0]), ones, atol=1e-9)
    assert np.allclose(_numpy(diagnosis.row_overlap[0]), ones, atol=1e-9)
    assert np.allclose(_numpy(dg.update_cosines(diagnosis.inner_products)[0]), ones, atol=1e-9)
    assert np.allclose(_numpy(dg.relative_norms(diagnosis.norms)[0]), np.array(scales) / np.mean(scales))
    assert float(diagnosis.conflict.against.abs().max()) <= 1e-20 * float(diagnosis.conflict.energy.sum())


def test_orthogonal_adapters_with_a_known_spectrum() -> None:
    """ΔW_t = U_t diag(σ_t) V_tᵀ on mutually orthogonal U_t, V_t: no overlap, no conflict, and both the sum and
    TSV are Σ ΔW_t, whose spectrum is all the σ's: the curve and every task's kept share are known."""
    sigmas = [np.array([5.0, 1.0]), np.array([4.0, 0.5]), np.array([3.0, 2.0])]
    left, right = _orthonormal(12, 6, 1), _orthonormal(9, 6, 2)
    bs = [left[:, 2 * t : 2 * t + 2] * s for t, s in enumerate(sigmas)]
    as_ = [right[:, 2 * t : 2 * t + 2].T for t in range(3)]
    energies = np.concatenate(sigmas) ** 2
    order = np.argsort(-energies)
    expected_curve = np.cumsum(energies[order]) / energies.sum()
    owner = np.repeat(np.arange(3), 2)[order]
    expected_kept = np.array([np.cumsum(np.where(owner == t, energies[order], 0)) for t in range(3)])
    expected_kept /= expected_kept[:, -1:]
    for rule in ("tsv", "ta"):
        diagnosis = _diagnose(bs, as_, rule)
        conflict, curve, kept = _shares(diagnosis)
        assert np.allclose(_numpy(diagnosis.column_overlap[0]), np.eye(3), atol=1e-9)
        assert np.allclose(_numpy(diagnosis.row_overlap[0]), np.eye(3), atol=1e-9)
        assert np.allclose(_numpy(dg.update_cosines(diagnosis.inner_products)[0]), np.eye(3), atol=1e-9)
        assert np.allclose(conflict, 0.0, atol=1e-12)
        assert np.allclose(curve, expected_curve, atol=1e-12)
        assert np.allclose(kept, expected_kept, atol=1e-12)
        # energies 25 16 9 4 1 0.25 (of 55.25), cumulative 45%, 74%, 90.5%, 97.7%, 99.5%, 100%
        summary = dg.summarize([diagnosis])
        assert summary.ranks_for_keeps == {0.90: 3, 0.95: 4, 0.99: 5}


@pytest.mark.parametrize("angles", [[0.0, np.pi / 2], [np.pi / 3, np.pi / 4, 0.2], [np.pi / 2] * 3])
def test_overlap_is_the_mean_squared_cosine_of_known_principal_angles(angles: list[float]) -> None:
    """span(B_2) = Q_1 cos θ + Q_⊥ sin θ has principal angles θ to span(B_1); B_2's mixing inside leaves them."""
    k = len(angles)
    basis = _orthonormal(16, 2 * k, 3)
    first, other = basis[:, :k], basis[:, k:]
    second = first * np.cos(angles) + other * np.sin(angles)
    mixing = np.random.default_rng(4).standard_normal((k, k))
    as_ = _factors([k, k], 16, 10, 5)[1]
    diagnosis = _diagnose([first * 2.0, second @ mixing], as_)
    assert abs(float(diagnosis.column_overlap[0, 0, 1]) - np.mean(np.cos(angles) ** 2)) < 1e-10


def test_opposite_adapters_conflict_on_half_their_energy() -> None:
    bs, as_ = _factors([3], 12, 10, 6)
    diagnosis = _diagnose([bs[0], -bs[0]], [as_[0], as_[0]])
    assert abs(float(diagnosis.conflict.against.sum() / diagnosis.conflict.energy.sum()) - 0.5) < 1e-12
    assert np.allclose(_numpy(dg.update_cosines(diagnosis.inner_products)[0]), [[1, -1], [-1, 1]], atol=1e-9)
    assert np.allclose(_numpy(diagnosis.column_overlap[0]), 1.0, atol=1e-9)


def test_a_missing_or_zero_adapter_gives_finite_figures() -> None:
    """A module one adapter lacks comes with rank 0; a zero adapter spans nothing and weighs nothing."""
    bs, as_ = _factors([3, 0, 2], 12, 10, 7)
    bs.append(np.zeros((12, 2)))
    as_.append(np.zeros((2, 10)))
    diagnosis = _diagnose(bs, as_)
    for figure in (diagnosis.column_overlap, diagnosis.row_overlap, diagnosis.inner_products, diagnosis.task_kept):
        assert torch.isfinite(figure).all()
    overlap = _numpy(diagnosis.column_overlap[0])
    assert np.allclose(overlap[[1, 3]], 0.0) and np.allclose(overlap[:, [1, 3]], 0.0)
    assert np.allclose(np.diag(overlap)[[0, 2]], 1.0)
    assert np.allclose(_numpy(diagnosis.conflict.energy[0, [1, 3]]), 0.0)
    summary = dg.summarize([diagnosis])
    assert torch.isfinite(summary.task_curve).all() and torch.isfinite(summary.cosine).all()
    assert np.allclose(_numpy(summary.task_curve[[1, 3]]), 1.0)  # nothing to keep


# ------------------------------------------------------------------------------------------------ invariances


@SETTINGS
@given(factor_sets(), st.randoms(use_true_random=False))
def test_figures_follow_a_permutation_of_the_adapters(factors: tuple, random) -> None:
    bs, as_ = factors
    order = list(range(len(bs)))
    random.shuffle(order)
    weights = [0.5 + t for t in range(len(bs))]
    first = _diagnose(bs, as_, weights=weights)
    shuffled = _diagnose([bs[i] for i in order], [as_[i] for i in order], weights=[weights[i] for i in order])
    for name in ("column_overlap", "row_overlap", "inner_products"):
        expected = _numpy(getattr(first, name)[0])[np.ix_(order, order)]
        assert np.allclose(_numpy(getattr(shuffled, name)[0]), expected, atol=1e-9)
    (conflict, curve, kept), (conflict_2, curve_2, kept_2) = _shares(first), _shares(shuffled)
    assert np.allclose(conflict_2, conflict[order], atol=1e-9)
    assert np.allclose(curve_2, curve, atol=1e-9)
    assert np.allclose(kept_2, kept[order], atol=1e-8)


@SETTINGS
@given(factor_sets(), st.lists(st.floats(0.1, 10.0), min_size=4, max_size=4), st.floats(0.01, 100.0))
def test_scale_invariances(factors: tuple, factors_per_task: list[float], common: float) -> None:
    """Overlaps ignore any per-adapter scale (signs included); cosines ignore positive ones; conflict shares,
    relative norms and the curves ignore a common positive scale."""
    bs, as_ = factors
    tasks = len(bs)
    per_task = factors_per_task[:tasks]
    first = _diagnose(bs, as_)
    signed = _diagnose([b * c * (-1) ** t for t, (b, c) in enumerate(zip(bs, per_task, strict=False))], as_)
    positive = _diagnose(bs, [a * c for a, c in zip(as_, per_task, strict=False)])
    common_scale = _diagnose([b * common for b in bs], as_)
    for name in ("column_overlap", "row_overlap"):
        assert np.allclose(_numpy(getattr(signed, name)), _numpy(getattr(first, name)), atol=1e-9)
    cosines = [_numpy(dg.update_cosines(d.inner_products)) for d in (first, positive)]
    assert np.allclose(cosines[1], cosines[0], atol=1e-9)
    for one, other in zip(_shares(first), _shares(common_scale), strict=True):
        assert np.allclose(one, other, atol=1e-9)
    norms = [_numpy(dg.relative_norms(d.norms)) for d in (first, common_scale)]
    assert np.allclose(norms[1], norms[0], rtol=1e-9)


def test_batched_modules_equal_one_by_one() -> None:
    cases = [_factors([3, 2, 2], 13, 11, seed) for seed in (10, 11)]
    singles = [_diagnose(bs, as_, "ties") for bs, as_ in cases]
    batched = dg.diagnose(
        torch.cat([_tensor(bs, 1) for bs, _ in cases]),
        torch.cat([_tensor(as_, 0) for _, as_ in cases]),
        [3, 2, 2],
        get_rule("ties"),
        torch.ones(3, dtype=torch.float64),
        _rule_params("ties"),
    )
    for index, single in enumerate(singles):
        for name in ("column_overlap", "row_overlap", "inner_products", "merge_energies", "task_kept"):
            assert torch.allclose(getattr(batched, name)[index], getattr(single, name)[0], rtol=1e-10, atol=1e-12)
        assert torch.allclose(batched.conflict.against[index], single.conflict.against[0], rtol=1e-10)


# --------------------------------------------------------------------------------------- ranks and pooling


def test_rank_for_keep_is_the_smallest_rank_reaching_the_share() -> None:
    curve = dg.energy_curve(torch.tensor([[4.0, 3.0, 2.0, 1.0], [9.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
    assert np.allclose(_numpy(curve), [[0.4, 0.7, 0.9, 1.0], [0.9, 1.0, 1.0, 1.0]])
    for keep, expected in ((0.4, [1, 1]), (0.41, [2, 1]), (0.9, [3, 1]), (0.95, [4, 2]), (1.0, [4, 2])):
        assert dg.rank_for_keep(curve, keep).tolist() == expected
        assert [dref.rank_for_keep(row, keep) for row in _numpy(curve)] == expected
    assert dg.energy_curve(torch.zeros(1, 3, dtype=torch.float64)).tolist() == [[1.0, 1.0, 1.0]]
    assert dg.rank_for_keep(dg.energy_curve(torch.zeros(1, 3, dtype=torch.float64)), 0.99).tolist() == [1]


def test_pooled_curve_pools_energies_over_modules_of_any_rank() -> None:
    """Modules (4, 3, 2, 1) and (10,) (K = 1): at rank r every module is cut to min(r, K)."""
    groups = [torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=torch.float64), torch.tensor([[10.0]], dtype=torch.float64)]
    assert np.allclose(_numpy(dg.pooled_curve(groups)), [14 / 20, 17 / 20, 19 / 20, 1.0])
    assert int(dg.rank_for_keep(dg.pooled_curve(groups), 0.95)) == 3


def test_summary_pools_modules_of_different_shapes() -> None:
    cases = [_factors([2, 3], 10, 9, 20), _factors([2, 3], 7, 12, 21), _factors([1, 1], 8, 8, 22)]
    groups = [[_diagnose(*cases[0]), _diagnose(*cases[1])], [_diagnose(*cases[2])]]
    summary = dg.summarize([d for group in groups for d in group])
    deltas = [ref.updates(*case) for case in cases]
    whole = [np.concatenate([d[t].ravel() for d in deltas]) for t in range(2)]
    assert np.allclose(_numpy(summary.dominance), dref.relative_norms(whole))
    assert np.allclose(_numpy(summary.cosine), dref.cosines(whole), atol=1e-9)
    overlaps = np.mean([dref.overlap(case[0]) for case in cases], axis=0)
    assert np.allclose(_numpy(summary.column_overlap), overlaps, atol=1e-9)
    conflicts = [dref.conflict(dref.whole_frame_coordinates(*case), [1.0, 1.0]) for case in cases]
    against, energy = (sum(part[i] for part in conflicts) for i in (0, 1))
    assert np.allclose(_numpy(summary.task_conflict), against / energy, atol=1e-9)
    assert abs(float(summary.conflict) - against.sum() / energy.sum()) < 1e-9
    merges = [ref.apply_rule("tsv", dref.whole_frame_coordinates(*case), [1, 1], _rule_params("tsv")) for case in cases]
    spectra = [np.linalg.svd(merged, compute_uv=False) ** 2 for merged in merges]
    kept = [np.array([s[: min(r, len(s))].sum() for r in range(1, 6)]) for s in spectra]
    assert np.allclose(_numpy(summary.curve), sum(kept) / sum(s.sum() for s in spectra), atol=1e-9)
    assert summary.curve.shape == (5,) and summary.task_curve.shape == (2, 5)
