"""The command line: version, `inspect` on generated and real adapters, and every refusal of `merge`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REAL_ADAPTERS, fails, listing, needs_shared, run_ctm, single_error_line
from reference import config_scale, core_space
from safetensors.torch import load_file

import ctm_cli

MINILM_TASKS = ["agnews", "banking77", "emotion6", "mpqa", "sst2", "subj", "trec", "tweet_offensive"]
WIDE = {"COLUMNS": "250"}


def spectra_by_numpy(folder: Path) -> dict[str, np.ndarray]:
    """Singular values of s·B·A per module, from the stored factors (NumPy, float64)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    result = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight")
        b = tensors[f"{name}.lora_B.weight"].to(torch.float64).numpy()
        a = a.to(torch.float64).numpy()
        s = config_scale(config, name.removeprefix("base_model.model."))
        if b.shape[0] * a.shape[1] <= 64 * 64:
            result[name] = np.linalg.svd(s * b @ a, compute_uv=False)
        else:  # large real modules: the same values from the rank-r core (two thin QRs), much cheaper
            result[name] = np.linalg.svd(core_space([a], [b], [s]).cores[0], compute_uv=False)
    return result


def inspect_json(folder: Path) -> dict:
    result = run_ctm("inspect", folder, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def check_spectra(info: dict, folder: Path) -> None:
    expected = spectra_by_numpy(folder)
    assert sorted(m["name"] for m in info["modules"]) == sorted(expected)
    for module in info["modules"]:
        want = expected[module["name"]][: module["rank"]]
        got = np.asarray(module["singular_values"])
        assert got.shape == want.shape, module["name"]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * want[0], err_msg=module["name"])
        np.testing.assert_allclose(got[:3], want[:3], rtol=1e-4, err_msg=module["name"])


def test_version():
    result = run_ctm("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"ctm {ctm_cli.__version__}"


@pytest.mark.parametrize(("r", "alpha", "rslora"), [(8, 16, False), (4, 4, True)], ids=["plain", "rslora"])
def test_inspect_generated(make_adapter, r, alpha, rslora):
    folder = make_adapter(r=r, alpha=alpha, use_rslora=rslora, seed=11)
    info = inspect_json(folder)
    assert info["r"] == r
    assert info["lora_alpha"] == alpha
    assert info["use_rslora"] is rslora
    assert info["lora_modules"] == 14
    assert info["base_model"] == "tiny-llama"
    assert info["scale"] == [pytest.approx(config_scale({"r": r, "lora_alpha": alpha, "use_rslora": rslora}))]
    assert info["lora_parameters"] == sum(
        t.numel() for t in load_file(str(folder / "adapter_model.safetensors")).values()
    )
    check_spectra(info, folder)

    table = run_ctm("inspect", folder, env=WIDE)
    assert table.exit_code == 0, table.stderr
    for word in ("base_model", "tiny-llama", "lora_modules", "per-module spectra", "model.layers.1.mlp.down_proj"):
        assert word in table.stdout


@needs_shared
def test_inspect_gpt2_fan_in_fan_out():
    folder = REAL_ADAPTERS / "gpt2-c_attn-a"
    info = inspect_json(folder)
    assert info["fan_in_fan_out"] is True
    assert info["lora_modules"] == 12
    assert info["r"] == 8 and info["lora_alpha"] == 8
    assert info["base_model"] == "gpt2"
    assert info["other_tensors"] == ["base_model.model.score.weight"]
    check_spectra(info, folder)
    table = run_ctm("inspect", folder, env=WIDE)
    assert table.exit_code == 0, table.stderr
    assert re.search(r"fan_in_fan_out\s+True", table.stdout)


@needs_shared
def test_inspect_distilbert_modules_to_save():
    folder = REAL_ADAPTERS / "distilbert-imdb"
    info = inspect_json(folder)
    assert info["modules_to_save"] == ["classifier", "score"]
    assert info["other_tensors"]
    assert all("classifier" in key for key in info["other_tensors"])
    assert info["other_parameters"] > 0
    assert info["lora_modules"] == 12
    table = run_ctm("inspect", folder, env=WIDE)
    assert table.exit_code == 0, table.stderr
    assert "classifier" in table.stdout


@needs_shared
@pytest.mark.parametrize("task", MINILM_TASKS)
def test_inspect_minilm(task):
    folder = REAL_ADAPTERS / "minilm-8" / task
    info = inspect_json(folder)
    assert info["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (info["r"], info["lora_alpha"], info["lora_modules"]) == (8, 16, 36)
    assert info["scale"] == [2.0]
    assert info["other_tensors"] == []
    check_spectra(info, folder)


@needs_shared
def test_inspect_lfs_pointer():
    folder = REAL_ADAPTERS / "lfs-pointer"
    result = run_ctm("inspect", folder)
    assert result.exit_code == 3
    line = single_error_line(result.stderr)
    assert "Git LFS pointer" in line
    assert str(folder / "adapter_model.safetensors") in line


@needs_shared
def test_merge_lfs_pointer(tmp_path):
    result = run_ctm("merge", REAL_ADAPTERS / "distilbert-imdb", REAL_ADAPTERS / "lfs-pointer", "-o", tmp_path / "out")
    assert result.exit_code == 3
    line = single_error_line(result.stderr)
    assert "Git LFS pointer" in line
    assert str(REAL_ADAPTERS / "lfs-pointer" / "adapter_model.safetensors") in line
    assert listing(tmp_path) == []


# ---------------------------------------------------------------- merge refusals


@pytest.fixture
def pair(make_adapter) -> list[Path]:
    return [make_adapter(r=8, alpha=16, seed=21), make_adapter(r=4, alpha=8, seed=22)]


def test_different_base_models(make_adapter, pair, out_parent):
    other = make_adapter(r=8, alpha=16, seed=23, base_model="other-llama")
    line = fails(["merge", pair[0], other, "-o", out_parent / "out", "--rank", "4"], 4, out_parent)
    assert "tiny-llama" in line and "other-llama" in line


def test_module_missing_in_one_adapter(make_adapter, pair, out_parent):
    fewer = make_adapter(r=8, alpha=16, seed=24, targets=("q_proj", "v_proj"))
    line = fails(["merge", pair[0], fewer, "-o", out_parent / "out", "--rank", "4"], 4, out_parent)
    assert re.search(
        r"module base_model\.model\.model\.layers\.\d\.\w+\.(k_proj|o_proj|gate_proj|up_proj|down_proj)", line
    )
    assert str(pair[0]) in line and str(fewer) in line


def test_shapes_disagree(make_adapter, pair, out_parent):
    wider = make_adapter(r=8, alpha=16, seed=25, model_overrides={"intermediate_size": 96})
    line = fails(["merge", pair[0], wider, "-o", out_parent / "out", "--rank", "4"], 4, out_parent)
    assert "shape" in line and "96" in line


def test_output_exists_not_empty(pair, out_parent):
    out = out_parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    line = fails(["merge", *pair, "-o", out, "--rank", "4"], 5, out_parent)
    assert "--force" in line
    assert listing(out) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"

    result = run_ctm("merge", *pair, "-o", out, "--rank", "4", "--force")
    assert result.exit_code == 0, result.stderr
    assert listing(out_parent) == ["out"]
    assert "keep.txt" not in listing(out)
    assert {"adapter_config.json", "adapter_model.safetensors", "merge_report.json"} <= set(listing(out))


def test_output_empty_folder_is_used(pair, out_parent):
    out = out_parent / "out"
    out.mkdir()
    result = run_ctm("merge", *pair, "-o", out, "--rank", "4")
    assert result.exit_code == 0, result.stderr
    assert listing(out_parent) == ["out"]
    assert "adapter_model.safetensors" in listing(out)


def test_output_is_a_file(pair, out_parent):
    out = out_parent / "out"
    out.write_text("a file")
    fails(["merge", *pair, "-o", out, "--rank", "4"], 5, out_parent)
    assert out.read_text() == "a file"
    fails(["merge", *pair, "-o", out, "--rank", "4", "--force"], 5, out_parent)
    assert out.read_text() == "a file"


def test_rank_zero(pair, out_parent):
    fails(["merge", *pair, "-o", out_parent / "out", "--rank", "0"], 2, out_parent)


def test_rank_too_large(pair, out_parent):
    # R = 8 + 4 = 12; k_proj/v_proj are 16 × 32, so 12 is the most any module allows.
    line = fails(["merge", *pair, "-o", out_parent / "out", "--rank", "13"], 2, out_parent)
    assert "1..12" in line
    result = run_ctm("merge", *pair, "-o", out_parent / "out", "--rank", "12")
    assert result.exit_code == 0, result.stderr


def test_rank_limited_by_module_shape(make_adapter, pair, out_parent):
    big = [*pair, make_adapter(r=12, alpha=24, seed=26)]  # R = 24 > 16 = out of k_proj
    line = fails(["merge", *big, "-o", out_parent / "out", "--rank", "17"], 2, out_parent)
    assert "1..16" in line
    assert "k_proj" in line or "v_proj" in line


def test_weights_count_mismatch(pair, out_parent):
    line = fails(["merge", *pair, "-o", out_parent / "out", "--rank", "4", "--weights", "1,2,3"], 2, out_parent)
    assert "--weights" in line


def test_missing_folder(pair, out_parent, tmp_path):
    missing = tmp_path / "no-such-adapter"
    line = fails(["merge", pair[0], missing, "-o", out_parent / "out", "--rank", "4"], 3, out_parent)
    assert str(missing) in line


@pytest.mark.parametrize("name", ["adapter[v2]", "odd[/]name"])
def test_error_message_keeps_brackets(pair, out_parent, tmp_path, name):
    missing = tmp_path / name
    line = fails(["merge", pair[0], missing, "-o", out_parent / "out", "--rank", "4"], 3, out_parent)
    assert str(missing) in line


@needs_shared
def test_modules_to_save_tensors_are_refused_not_dropped(out_parent):
    distilbert = REAL_ADAPTERS / "distilbert-imdb"
    line = fails(["merge", distilbert, distilbert, "-o", out_parent / "out", "--rank", "4"], 4, out_parent)
    assert "classifier" in line and "modules_to_save" in line
