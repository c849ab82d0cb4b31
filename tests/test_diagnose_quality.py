"""The pure parts of scripts/diagnose_quality.py: its statistics, and the adapters' figures it reads."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import inputs_of

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from diagnose_quality import (
    MERGES,
    benjamini_hochberg,
    load_groups,
    permutation_p,
    rankdata,
    seed_figures,
    spearman,
    task_permutations,
)


def test_ranks_average_ties_and_spearman_is_the_correlation_of_ranks() -> None:
    assert rankdata(np.array([10.0, 30.0, 20.0, 30.0])).tolist() == [1.0, 3.5, 2.0, 3.5]
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([5.0, 9.0, 100.0])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # ranks (1, 2, 3, 4) against (2, 1, 4, 3): 1 − 6·Σd²/(n(n²−1)) = 1 − 6·4/60
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([2.0, 1, 4, 3])) == pytest.approx(0.6)
    assert np.isnan(spearman(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])))


def test_spearman_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 30).astype(float), rng.standard_normal(30)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_benjamini_hochberg_q_values() -> None:
    q = benjamini_hochberg([0.01, 0.04, 0.03, 0.5])
    assert q == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])


def test_task_permutations_move_a_tasks_points_together_and_p_is_exact() -> None:
    points = [(seed, task) for seed in (0, 1) for task in range(3)]
    permutations = task_permutations(points, 3)
    assert permutations.shape == (6, 6)
    for row in permutations:
        mapped = [points[i] for i in row]
        assert [p[0] for p in mapped] == [p[0] for p in points]  # seeds stay
        assert [p[1] for p in mapped[:3]] == [p[1] for p in mapped[3:]]  # both seeds permuted alike
    assert len({tuple(row) for row in permutations}) == 6
    x = np.array([0.0, 1.0, 2.0, 0.5, 1.5, 2.5])
    y = np.array([1.0, 2.0, 3.0, 1.2, 2.2, 3.2])
    orders = itertools.permutations(range(3))
    brute = [abs(spearman(x, y[[points.index((s, order[t])) for s, t in points]])) for order in orders]
    assert permutation_p(x, y, permutations) == pytest.approx(np.mean(np.array(brute) >= abs(spearman(x, y)) - 1e-12))


def test_seed_figures_read_the_adapters_as_the_engine_scales_them(make_adapter) -> None:
    folders = [make_adapter(r=4, alpha=8, seed=seed) for seed in (0, 1, 2)]
    groups = load_groups(folders)
    expected = inputs_of(folders)
    for group in groups:
        for index, name in enumerate(group.names):
            a_s, b_s, scales = expected[name]
            delta = sum(s * b @ a for a, b, s in zip(a_s, b_s, scales, strict=True))
            assert np.allclose((group.b_cat[index] @ group.a_cat[index]).numpy(), delta, atol=1e-10)
    figures = seed_figures(groups, [2, 4])
    for name in ("overlap_B", "overlap_A", "conflict"):
        assert ((figures["per_task"][name] >= 0) & (figures["per_task"][name] <= 1 + 1e-12)).all()
    assert figures["per_task"]["dominance"].mean() == pytest.approx(1.0)
    for combo in MERGES:
        kept = [figures["per_merge"][combo][rank]["kept"] for rank in (2, 4)]
        assert ((kept[0] <= kept[1] + 1e-12) & (kept[1] <= 1 + 1e-12)).all()
