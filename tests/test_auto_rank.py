"""`ctm merge --rank auto --keep S [--rank-per-module]`: the chosen ranks against a float64 reference (merge-then-
compress with task arithmetic, whose full-rank merge is the exact weighted sum), PEFT loading a rank_pattern output,
the report's account of the choice, the refusals, and the recipe keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import diagnostics_reference as dref
import merge_reference as ref
import numpy as np
import pytest
import torch
from helpers import fails, inputs_of, read_adapter, relative, run_ctm, written_deltas
from test_quirks import check_peft_forward

from ctm_cli import diagnostics as dg
from ctm_cli.auto_rank import choose_ranks
from ctm_cli.diagnosis import GroupDiagnosis
from ctm_cli.errors import UsageError
from ctm_cli.module_spec import ModuleSpec
from ctm_cli.recipe import parse_recipe

WEIGHTS = [1.0, 0.5]


@pytest.fixture(scope="module")
def two(make_adapter) -> list[Path]:
    """Two real PEFT adapters of different ranks and scales (r=8, α=16) and (r=4, α=8)."""
    return [make_adapter(r=8, alpha=16, seed=31), make_adapter(r=4, alpha=8, seed=32)]


def exact_sums(folders: list[Path]) -> dict[str, np.ndarray]:
    """Σ w_t ΔW_t per module, in float64: the full-rank merge of mtc + ta (λ 1)."""
    return {
        name: sum(w * s * b @ a for w, s, a, b in zip(WEIGHTS, scales, As, Bs, strict=True))
        for name, (As, Bs, scales) in inputs_of(folders).items()
    }


def spectra(sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """σ² of each module's full-rank merge."""
    return {name: np.linalg.svd(matrix, compute_uv=False) ** 2 for name, matrix in sums.items()}


def pooled_rank(energies: dict[str, np.ndarray], keep: float) -> int:
    """The smallest r with Σ_modules Σ_{i≤r} σ_i² ≥ keep · Σ all σ²."""
    total = sum(e.sum() for e in energies.values())
    width = max(len(e) for e in energies.values())
    kept = [sum(e[:r].sum() for e in energies.values()) / total for r in range(1, width + 1)]
    return dref.rank_for_keep(np.array(kept), keep)


def truncated(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] * s[:rank] @ vh[:rank]


def merge(folders: list[Path], out: Path, *args: str) -> dict:
    result = run_ctm("merge", *folders, "--weights", "1,0.5", "-o", out, "--quiet", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads((out / "merge_report.json").read_text())


def test_choose_ranks_global_and_per_module() -> None:
    """Two modules with spectra (4, 3, 2, 1) and (10, 0, 0, 0) (energies)."""
    energies = torch.tensor([[4.0, 3.0, 2.0, 1.0], [10.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    specs = [ModuleSpec(name, 8, 8, (2, 2), False) for name in ("a", "b")]
    empty = torch.zeros(2, 2, 2, dtype=torch.float64)
    diagnosis = dg.Diagnosis(empty, empty, empty, dg.Conflict(empty[..., 0], empty[..., 0]), energies, empty)
    groups = [GroupDiagnosis(specs, diagnosis, [])]
    # pooled: 14/20, 17/20, 19/20, 1; per module: a 0.4, 0.7, 0.9, 1 and b 1, 1, 1, 1
    whole = choose_ranks(groups, 0.85, per_module=False)
    assert whole.global_rank == 2 and whole.ranks == {"a": 2, "b": 2}
    assert whole.total_kept == pytest.approx(17 / 20) and whole.total_kept_below == pytest.approx(14 / 20)
    assert whole.kept == pytest.approx({"a": 0.7, "b": 1.0})
    each = choose_ranks(groups, 0.85, per_module=True)
    assert each.global_rank is None and each.ranks == {"a": 3, "b": 1}
    assert each.kept_below == pytest.approx({"a": 0.7, "b": None})
    assert each.total_kept == pytest.approx(19 / 20)


@pytest.mark.parametrize("keep", [0.8, 0.95])
def test_global_rank_is_the_smallest_keeping_the_share(two, tmp_path, keep: float) -> None:
    sums = exact_sums(two)
    expected_rank = pooled_rank(spectra(sums), keep)
    report = merge(two, tmp_path / "out", "--method", "mtc", "--rule", "ta", "--rank", "auto", "--keep", str(keep))
    choice = report["rank_choice"]
    assert choice["global_rank"] == expected_rank == report["settings"]["written_rank"]
    assert report["settings"]["requested_rank"] == "auto"
    written = written_deltas(tmp_path / "out")
    for name, matrix in sums.items():
        assert relative(written[name], truncated(matrix, expected_rank)) < 1e-5, name
    lost = sum(np.sum((written[n] - m) ** 2) for n, m in sums.items()) / sum(np.sum(m**2) for m in sums.values())
    assert report["summary"]["total_full_rank_loss"] == pytest.approx(lost, rel=1e-4)
    assert 1 - lost >= keep - 1e-6 and choice["total_kept"] == pytest.approx(1 - lost, abs=1e-6)
    assert choice["total_kept_one_rank_lower"] < keep
    markdown = (tmp_path / "out" / "merge_report.md").read_text()
    assert f"--rank auto: rank {expected_rank} for every module" in markdown


def test_rank_per_module_writes_a_rank_pattern_that_peft_loads(two, tmp_path, load_base) -> None:
    keep = 0.97
    sums = exact_sums(two)
    expected = {name: dref.rank_for_keep(np.cumsum(e) / e.sum(), keep) for name, e in spectra(sums).items()}
    out = tmp_path / "out"
    auto = ("--rank", "auto", "--keep", str(keep), "--rank-per-module")
    report = merge(two, out, "--method", "mtc", "--rule", "ta", *auto)
    config, modules = read_adapter(out)
    assert {name: a.shape[0] for name, (a, _) in modules.items()} == expected
    assert len(set(expected.values())) > 1 and config["rank_pattern"]  # the modules do differ here
    assert {m["name"]: m["rank"] for m in report["rank_choice"]["modules"]} == expected
    written = written_deltas(out)  # with the scale PEFT reads from rank_pattern / alpha_pattern
    for name, matrix in sums.items():
        assert relative(written[name], truncated(matrix, expected[name])) < 1e-5, name
        kept = 1 - np.sum((written[name] - matrix) ** 2) / np.sum(matrix**2)
        assert kept >= keep - 1e-6
    check_peft_forward(load_base, out)
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(), out)
    for name, matrix in sums.items():
        layer = model.get_submodule(name)
        delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]).detach()
        assert relative(delta.double().numpy(), truncated(matrix, expected[name])) < 1e-5, name


def test_default_merge_with_rank_auto_keeps_the_share(two, tmp_path, load_base) -> None:
    """ctm's default (tsv on the whole core space): each module keeps at least the share of its full-rank merge,
    the rule on the cores at rank R (reference: merge_reference.core)."""
    keep = 0.9
    out = tmp_path / "out"
    report = merge(two, out, "--rank", "auto", "--keep", str(keep), "--rank-per-module")
    written = written_deltas(out)
    for name, (As, Bs, scales) in inputs_of(two).items():
        bs = [w * s * b for w, s, b in zip(WEIGHTS, scales, Bs, strict=True)]
        total = sum(a.shape[0] for a in As)
        tsv = ref.cut_rule(lambda xs: ref.apply_rule("tsv", xs, [1.0, 1.0], {"lambda": 1.0}), total)
        full = ref.core(bs, As, tsv)[0]
        kept = 1 - np.sum((written[name] - full) ** 2) / np.sum(full**2)
        module = next(m for m in report["modules"] if m["name"] == name)
        assert kept >= keep - 1e-5 and module["full_rank_loss"] == pytest.approx(1 - kept, abs=1e-5), name
    check_peft_forward(load_base, out)


def test_dry_run_shows_the_chosen_ranks(two, tmp_path) -> None:
    result = run_ctm("merge", *two, "-o", tmp_path / "out", "--rank", "auto", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    rank = plan["rank_choice"]["global_rank"]
    assert plan["settings"]["written_rank"] == rank and not (tmp_path / "out").exists()
    assert {module["name"]: module["rank"] for module in plan["rank_choice"]["modules"]} == dict.fromkeys(
        [module["name"] for module in plan["rank_choice"]["modules"]], rank
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "auto", "-p", "frame_rank=4"], "--rank auto needs ctm with frame_rank 0 and isotropic 0"),
        (["--rank", "auto", "--rule", "iso_c"], "not ctm (frame_rank 0, isotropic 0) with rule iso_c"),
        (["--rank", "auto", "--method", "mtc", "--rule", "iso_c"], "not mtc with rule iso_c"),
        (["--rank", "auto", "-p", "isotropic=1"], "not ctm (frame_rank 0, isotropic 1) with rule tsv"),
        (["--rank", "auto", "--method", "mtc", "--rule", "ties"], "not mtc with rule ties; give --rank N"),
        (["--rank", "auto", "--method", "knots"], "not knots with rule ta"),
        (["--keep", "0.9"], "--keep applies only with --rank auto (got --rank 16)"),
        (["--rank-per-module"], "--rank-per-module applies only with --rank auto"),
        (["--rank", "auto", "--keep", "0"], "--keep must be a share in (0, 1], got 0.0"),
        (["--rank", "auto", "--keep", "1.5"], "--keep must be a share in (0, 1], got 1.5"),
        (["--rank", "some"], "invalid value for '--rank' / '-r': expected an integer or auto, got 'some'"),
    ],
)
def test_refusals(two, out_parent, args: list[str], message: str) -> None:
    line = fails(["merge", *two, "-o", out_parent / "out", *args], 2, out_parent)
    assert message in line, line


def test_recipe_keys() -> None:
    text = "adapters:\n  - source: a\n  - source: b\nrank: auto\nkeep: 0.9\nrank_per_module: true\n"
    recipe = parse_recipe(text, "r.yaml")
    assert (recipe.rank, recipe.keep, recipe.rank_per_module) == ("auto", 0.9, True)
    with pytest.raises(UsageError, match=re.escape("r.yaml:4: rank: expected an integer, got 'automatic'")):
        parse_recipe(text.replace("rank: auto", "rank: automatic"), "r.yaml")
    with pytest.raises(UsageError, match=re.escape("r.yaml:5: keep: must be a share in")):
        parse_recipe(text.replace("keep: 0.9", "keep: 2"), "r.yaml")
