"""`ctm inspect a/ b/ …`: the figures of real PEFT adapters against the float64 references of
tests/diagnostics_reference.py, adapters of known overlap (identical: 1, orthogonal: 0), the terminal view, the
PNG plot and the refusals."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import diagnostics_reference as dref
import merge_reference as ref
import numpy as np
import pytest
import torch
from helpers import edit_tensors, fails, inputs_of, run_ctm


def inspect_json(*folders: Path) -> dict:
    result = run_ctm("inspect", *folders, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def copy(folder: Path, target: Path) -> Path:
    return Path(shutil.copytree(folder, target, copy_function=shutil.copyfile))


def orthogonal_partner(folder: Path, target: Path) -> Path:
    """A copy of an adapter whose every B has columns orthogonal to the original's, and every A rows orthogonal to
    the original's: overlap 0 in both spaces, cosine 0."""
    partner = copy(folder, target)

    def change(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if k.endswith(("lora_A.weight", "lora_B.weight"))]:
            factor = tensors[key].double()
            columns = factor if key.endswith("lora_B.weight") else factor.T  # (dim, r)
            dim, rank = columns.shape
            noise = torch.randn(dim, rank, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            mixed = torch.cat([columns, noise], 1)
            basis = torch.linalg.qr(mixed).Q[:, rank : 2 * rank]  # orthogonal to the original's span
            tensors[key] = (basis if key.endswith("lora_B.weight") else basis.T).to(torch.float32).contiguous()

    edit_tensors(partner, change)
    return partner


def test_identical_adapters_overlap_fully_without_conflict(make_adapter, tmp_path) -> None:
    first = make_adapter(r=4, alpha=8, seed=51)
    data = inspect_json(first, copy(first, tmp_path / "same"))
    total = data["total"]
    for key in ("column_overlap", "row_overlap", "cosine"):
        assert np.allclose(total[key], 1.0, atol=1e-5), key
    assert np.allclose(total["dominance"], 1.0) and abs(total["conflict"]) < 1e-9
    assert all(abs(module["conflict"]) < 1e-9 for module in data["modules"])
    # two equal updates sum to one of rank 4: merge-then-compress keeps it all at rank 4
    assert all(module["curves"]["mtc+ta"][3] > 1 - 1e-6 for module in data["modules"])


def test_orthogonal_adapters_do_not_overlap(make_adapter, tmp_path) -> None:
    first = make_adapter(r=4, alpha=8, seed=52)
    data = inspect_json(first, orthogonal_partner(first, tmp_path / "orthogonal"))
    total = data["total"]
    for key in ("column_overlap", "row_overlap", "cosine"):
        assert np.allclose(total[key], np.eye(2), atol=1e-5), key
    assert abs(total["conflict"]) < 1e-6  # disjoint supports in the frame: nothing to disagree on


def test_figures_match_the_float64_reference(make_adapter) -> None:
    # R = 16 ≤ every module's sides (k_proj, v_proj: 16 × 32), where the reference's cores are R × R as ctm's
    folders = [make_adapter(r=8, alpha=16, seed=53), make_adapter(r=4, alpha=8, seed=54), make_adapter(r=4, seed=55)]
    data = inspect_json(*folders)
    assert data["adapters"] == [str(folder) for folder in folders]
    assert [c["label"] for c in data["curves"]] == ["ctm+tsv", "mtc+ta"]
    inputs = inputs_of(folders)
    rows = {module["name"]: module for module in data["modules"]}
    assert sorted(rows) == sorted(inputs)
    spectra = {"ctm+tsv": [], "mtc+ta": []}
    for name, (As, Bs, scales) in inputs.items():
        bs = [s * b for s, b in zip(scales, Bs, strict=True)]
        row = rows[name]
        assert np.allclose(row["column_overlap"], dref.overlap(bs), atol=1e-5), name
        assert np.allclose(row["row_overlap"], dref.overlap([a.T for a in As]), atol=1e-5), name
        deltas = ref.updates(bs, As)
        assert np.allclose(row["cosine"], dref.cosines(deltas), atol=1e-5), name
        assert np.allclose(row["dominance"], dref.relative_norms(deltas), rtol=1e-5), name
        against, energy = dref.conflict(dref.whole_frame_coordinates(bs, As), [1.0] * 3)
        assert row["conflict"] == pytest.approx(against.sum() / energy.sum(), abs=1e-5), name
        coordinates = dref.whole_frame_coordinates(bs, As)
        tsv = ref.apply_rule("tsv", coordinates, [1.0] * 3, {"lambda": 1.0})
        for label, merged in (("ctm+tsv", tsv), ("mtc+ta", sum(deltas))):
            width = len(row["curves"][label])  # R; the reference's min(m, n) may be less, the rest keeps it all
            curve = np.concatenate([dref.curve(merged), np.ones(width)])[:width]
            assert np.allclose(row["curves"][label], curve, atol=1e-5), (name, label)
            assert row["ranks_for_keep"][label]["0.95"] == dref.rank_for_keep(curve, 0.95)
            spectra[label].append(np.linalg.svd(merged, compute_uv=False) ** 2)
    for label, energies in spectra.items():  # one rank for every module: the energies pooled
        width = len(data["total"]["curves"][label])
        kept = np.array([sum(e[:r].sum() for e in energies) for r in range(1, width + 1)])
        assert np.allclose(data["total"]["curves"][label], kept / kept[-1], atol=1e-5), label
    worst = data["worst_modules"]
    ranks = [w["rank_for_95"] for w in worst]
    assert len(worst) == 5 and ranks == sorted(ranks, reverse=True)


def test_terminal_view(make_adapter) -> None:
    folders = [make_adapter(r=4, alpha=8, seed=56), make_adapter(r=4, alpha=8, seed=57)]
    result = run_ctm("inspect", *folders)
    assert result.exit_code == 0, result.stderr
    for text in ("2 adapters of tiny-llama", "dominance", "ctm+tsv", "mtc+ta", "rank for 90 / 95 / 99%", "layers."):
        assert text in result.stdout, text
    assert "base_model.model" not in result.stdout  # the shared prefix is dropped


def test_plot_writes_a_png(make_adapter, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    folders = [make_adapter(r=4, alpha=8, seed=56), make_adapter(r=4, alpha=8, seed=57)]
    result = run_ctm("inspect", *folders, "--plot", tmp_path / "adapters.png", "--json")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "adapters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(result.stdout)["total"]["modules"] == 14


def test_plot_without_matplotlib_says_how_to_install_it(make_adapter, out_parent, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    folders = [make_adapter(r=4, alpha=8, seed=56), make_adapter(r=4, alpha=8, seed=57)]
    line = fails(["inspect", *folders, "--plot", out_parent / "a.png"], 2, out_parent)
    assert "--plot needs matplotlib: pip install 'ctm-merge[plot]'" in line


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--plot", "{out}/a.jpg"], 2, "the file must end in .png"),
        (["--plot", "{out}/missing/a.png"], 5, "does not exist"),
    ],
)
def test_plot_refusals(make_adapter, out_parent, extra: list[str], code: int, message: str) -> None:
    if code == 5:  # the folder is checked after matplotlib
        pytest.importorskip("matplotlib")
    folders = [make_adapter(r=4, alpha=8, seed=56), make_adapter(r=4, alpha=8, seed=57)]
    line = fails(["inspect", *folders, *(arg.format(out=out_parent) for arg in extra)], code, out_parent)
    assert message in line


def test_refusals(make_adapter, out_parent) -> None:
    one = make_adapter(r=4, alpha=8, seed=56)
    assert "--plot needs two or more adapters" in fails(["inspect", one, "--plot", out_parent / "a.png"], 2, out_parent)
    other_shape = make_adapter(r=4, alpha=8, seed=58, model_overrides={"intermediate_size": 48})
    line = fails(["inspect", one, other_shape], 4, out_parent)
    assert "mlp" in line
