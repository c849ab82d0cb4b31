"""Every method's full_rank_loss (what the rank-r output loses against the same rule at full rank) against the
float64 references of tests/merge_reference.py, and ctm's kept_energy past the merged matrix's rank."""

from __future__ import annotations

from dataclasses import replace

import merge_reference as ref
import numpy as np
import pytest
import torch
from test_methods import CASES, PAIRS, RANDOM_RULES, RULE_PARAMS, Case, expected, merge

from ctm_cli.methods import METHODS, MergeSettings
from ctm_cli.methods.common import rule_at_full_rank
from ctm_cli.rules import get_rule


def full_rank_reference(method: str, rule: str, case: Case) -> np.ndarray:
    """F: the method with the same rule at full rank (ctm: the rule on the whole core space; linear-rule-only
    methods: the exact Σ c_t ΔW_t)."""
    total = sum(case.ranks)
    out, inp = case.bs[0].shape[0], case.as_[0].shape[1]
    if method in ("ctm", "core", "knots"):
        return expected(method, rule, replace(case, rank=total))[0]
    if method == "mtc":
        return expected(method, rule, replace(case, rank=min(out, inp)))[0]
    return ref.cat(case.bs, case.as_, ref.linear_coefficients(rule, case.weights, RULE_PARAMS[rule]))


def lost_share(written: np.ndarray, full: np.ndarray) -> float:
    return float(np.sum((written - full) ** 2) / np.sum(full**2))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("method", "rule"), [pair for pair in PAIRS if pair[1] not in RANDOM_RULES])
def test_full_rank_loss_matches_reference(method: str, rule: str, case: str) -> None:
    data = CASES[case]
    [delta], result = merge(method, rule, data)
    want = lost_share(delta, full_rank_reference(method, rule, data))
    assert result.full_rank_loss is not None
    assert float(result.full_rank_loss[0]) == pytest.approx(want, abs=2e-6)


@pytest.mark.parametrize("rule", ["ta", "ties", "tsv", "iso_c"])
@pytest.mark.parametrize("frame_rank", [1, 7])
def test_ctm_in_a_hooi_frame_loses_against_the_rule_on_the_whole_core_space(rule: str, frame_rank: int) -> None:
    """ctm at full rank frames the whole core space: F is Core Space merging at rank R."""
    data = CASES["T3"]
    [delta], result = merge("ctm", rule, data, params={"frame_rank": frame_rank})
    want = lost_share(delta, full_rank_reference("core", rule, data))
    assert float(result.full_rank_loss[0]) == pytest.approx(want, abs=2e-6)
    assert float(result.full_rank_loss[0]) > 1e-3  # the cut to rank 6 loses something here


def test_the_reference_of_a_random_rule_draws_from_a_copy_of_the_generator() -> None:
    """dare's full-rank reference leaves the merge's generator where it was: the merge makes the same draws with
    or without the report's reference."""
    generator = torch.Generator().manual_seed(3)
    before = generator.get_state()
    settings = MergeSettings(
        4, get_rule("dare"), get_rule("dare").resolve({}), torch.ones(3, dtype=torch.float64), generator=generator
    )
    stack = torch.randn(3, 5, 5, dtype=torch.float64)
    first, second = rule_at_full_rank(stack, settings), rule_at_full_rank(stack, settings)
    assert torch.equal(generator.get_state(), before)
    assert torch.equal(first, second)
    _, result = merge("ctm", "dare", CASES["T3"], params={"frame_rank": 6})
    assert result.full_rank_loss is not None and torch.isfinite(result.full_rank_loss).all()


@pytest.mark.parametrize("method", ["ctm", "core"])
def test_full_rank_merge_loses_nothing(method: str) -> None:
    data = CASES["T4"]
    [_], result = merge(method, "ties", data, rank=sum(data.ranks) if method == "ctm" else 0)
    assert float(result.full_rank_loss[0]) < 1e-10


def test_every_method_reports_a_full_rank_loss() -> None:
    data = CASES["T2"]
    for method in sorted(METHODS):
        _, result = merge(method, "ta", data)
        assert result.full_rank_loss is not None, method


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_ctm_kept_energy_counts_only_the_merged_matrix_s_spaces(rank: int) -> None:
    """ΔW_1 = X + Y, ΔW_2 = X − Y (X ⊥ Y): their sum 2X has rank 1, so a merge at any rank keeps X's share of each
    update and no more (the cut's null singular vectors, arbitrary in the core space, are no part of the output)."""
    basis_out = np.linalg.qr(np.random.default_rng(0).standard_normal((10, 2)))[0]
    basis_in = np.linalg.qr(np.random.default_rng(1).standard_normal((9, 2)))[0].T
    bx, by, ax, ay = 3.0 * basis_out[:, :1], 2.0 * basis_out[:, 1:], basis_in[:1], basis_in[1:]
    rows = np.vstack([ax, ay])
    case = Case([np.hstack([bx, by]), np.hstack([bx, -by])], [rows, rows], [1.0, 1.0], rank)
    [delta], result = merge("ctm", "ta", case)
    assert np.allclose(delta, 2 * RULE_PARAMS["ta"]["lambda"] * bx @ ax, atol=1e-6)
    assert np.allclose(result.kept_energy[0].cpu().numpy(), 9.0 / (9.0 + 4.0), atol=1e-9)
