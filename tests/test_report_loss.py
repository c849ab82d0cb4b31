"""merge_report.json / .md: what the rank-r output loses against the same rule at full rank (per module, in total,
worst first) for every rule, against float64 references, and the inputs' diagnosis block."""

from __future__ import annotations

import json
from pathlib import Path

import merge_reference as ref
import numpy as np
import pytest
from helpers import inputs_of, run_ctm, written_deltas


@pytest.fixture(scope="module")
def two(make_adapter) -> list[Path]:
    return [make_adapter(r=8, alpha=16, seed=61), make_adapter(r=4, alpha=8, seed=62)]


def merge(folders: list[Path], out: Path, *args: str) -> dict:
    result = run_ctm("merge", *folders, "-o", out, "--quiet", "--rank", "4", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads((out / "merge_report.json").read_text())


def core_reference(folders: list[Path], rule: str, params: dict) -> dict[str, np.ndarray]:
    """F per module: the rule on the whole core space at full rank (ctm's merge at rank R; reference code)."""
    full = {}
    for name, (As, Bs, scales) in inputs_of(folders).items():
        bs = [s * b for s, b in zip(scales, Bs, strict=True)]
        total = sum(a.shape[0] for a in As)
        cut = ref.cut_rule(lambda xs: ref.apply_rule(rule, xs, [1.0, 1.0], params), total)
        full[name] = ref.core(bs, As, cut)[0]
    return full


@pytest.mark.parametrize(
    ("args", "rule", "params"),
    [
        ((), "tsv", {"lambda": 1.0}),  # the default: a cut of F itself
        (("--rule", "ties", "-p", "frame_rank=1"), "ties", {"density": 0.2, "lambda": 1.0}),  # the paper's frame
    ],
    ids=["default", "hooi-ties"],
)
def test_loss_against_the_full_rank_merge(two, tmp_path, args: tuple[str, ...], rule: str, params: dict) -> None:
    out = tmp_path / "out"
    report = merge(two, out, *args, "--diagnose")  # the diagnosis gives each module's ‖F‖² to pool the losses by
    written, full = written_deltas(out), core_reference(two, rule, params)
    lost = {name: np.sum((written[name] - f) ** 2) for name, f in full.items()}
    for module in report["modules"]:
        name = module["name"]
        assert module["full_rank_loss"] == pytest.approx(lost[name] / np.sum(full[name] ** 2), abs=1e-5), name
    total = sum(lost.values()) / sum(np.sum(f**2) for f in full.values())
    assert report["summary"]["total_full_rank_loss"] == pytest.approx(total, rel=1e-4)
    worst = max(report["modules"], key=lambda m: m["full_rank_loss"])
    assert report["summary"]["max_full_rank_loss"] == worst["full_rank_loss"]
    markdown = (out / "merge_report.md").read_text()
    assert "not computed" not in markdown
    assert f"energy lost against the full-rank {rule} merge" in markdown
    assert f"{100 * total:.2f}% in total" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| base_model.")]
    assert rows[0].startswith(f"| {worst['name']} |")  # worst first
    assert len(markdown.splitlines()) < 60


def test_report_holds_the_diagnosis(two, tmp_path) -> None:
    report = merge(two, tmp_path / "out", "--weights", "1,0.5", "--diagnose")
    diagnosis = report["diagnosis"]
    assert set(diagnosis) >= {"adapters", "curves", "total", "worst_modules", "modules"}
    assert [c["label"] for c in diagnosis["curves"]] == ["ctm+tsv", "mtc+ta"]
    assert len(diagnosis["modules"]) == len(report["modules"]) and len(diagnosis["worst_modules"]) == 5
    total = diagnosis["total"]
    assert np.allclose(np.diag(total["column_overlap"]), 1.0) and np.allclose(np.diag(total["row_overlap"]), 1.0)
    # at the merge's rank, the curve is what the default merge keeps (1 − its total loss)
    assert total["curves"]["ctm+tsv"][3] == pytest.approx(1 - report["summary"]["total_full_rank_loss"], abs=1e-5)
    markdown = (tmp_path / "out" / "merge_report.md").read_text()
    assert "Diagnosis of the inputs" in markdown and "one rank for every module keeping 90 / 95 / 99%" in markdown


def test_without_diagnose_the_report_pools_the_loss_by_the_plain_mean(two, tmp_path) -> None:
    """The diagnosis reads the inputs a second time, so it is opt-in: without it the report has no `diagnosis`,
    and the total loss is the modules' plain mean, said so in the JSON and the Markdown."""
    out = tmp_path / "out"
    report = merge(two, out)
    assert "diagnosis" not in report
    summary = report["summary"]
    losses = [module["full_rank_loss"] for module in report["modules"]]
    assert summary["total_full_rank_loss_pooling"] == "mean"
    assert summary["total_full_rank_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    markdown = (out / "merge_report.md").read_text()
    assert "in total (mean over modules)" in markdown and "Diagnosis of the inputs" not in markdown
