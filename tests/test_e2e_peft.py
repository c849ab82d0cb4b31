"""End to end: real PEFT adapters on a tiny Llama → `ctm merge` → checked against the NumPy reference and PEFT."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PREFIX, WEIGHTS, inputs_of, read_adapter, relative, run_ctm, stored_dtypes, written_deltas
from reference import ctm_ta, exact_sum
from safetensors.torch import load_file, save_file

# (r, alpha, use_rslora, seed) of the three adapters merged throughout.
THREE = [(8, 16, False, 1), (4, 4, True, 2), (12, 24, False, 3)]
CUSTOM = {"weights": [1.0, -0.5, 2.0], "lam": 0.7, "beta": 0.25}
CUSTOM_ARGS = ["--weights", "1,-0.5,2", "--lambda", "0.7", "--beta", "0.25"]
PAPER_TA = ["--rule", "ta", "--param", "frame_rank=1"]  # DESIGN's CtM-TA: the frame has the output rank


@pytest.fixture(scope="module")
def three(make_adapter) -> list[Path]:
    """Three real adapters: (r=8, α=16), (r=4, α=4, rsLoRA), (r=12, α=24) on all seven projections."""
    return [make_adapter(r=r, alpha=alpha, use_rslora=rs, seed=seed) for r, alpha, rs, seed in THREE]


@pytest.fixture(scope="module")
def merged_default(three, tmp_path_factory) -> Path:
    """`ctm merge a b c --rank 8 --rule ta`, written once for the tests that only read it."""
    out = tmp_path_factory.mktemp("merged") / "out"
    result = run_ctm("merge", *three, "--rank", "8", *PAPER_TA, "-o", out)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize("custom", [False, True], ids=["defaults", "weights-lambda-beta"])
def test_ctm_matches_reference(three, tmp_path, custom):
    out = tmp_path / "out"
    result = run_ctm("merge", *three, "--rank", "8", *PAPER_TA, "-o", out, *(CUSTOM_ARGS if custom else []))
    assert result.exit_code == 0, result.stderr
    settings = CUSTOM if custom else {"weights": None, "lam": 1.0, "beta": 1.0}

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8
    assert config["use_rslora"] is False
    report = json.loads((out / "merge_report.json").read_text())
    stats = {m["name"]: m for m in report["modules"]}

    inputs = inputs_of(three)
    written = written_deltas(out)
    assert sorted(written) == sorted(inputs)
    assert len(written) == 14
    _, modules = read_adapter(out)
    for name, (As, Bs, scales) in inputs.items():
        a, b = modules[name]
        assert a.shape == (8, As[0].shape[1]) and b.shape == (Bs[0].shape[0], 8)
        expected = ctm_ta(As, Bs, scales, 8, settings["weights"], settings["lam"], settings["beta"])
        assert relative(written[name], expected.delta) < 1e-4, name
        # HOOI only ever adds energy; the report's figures are those of the reference.
        assert expected.frame.energy >= expected.frame.start_energy * (1 - 1e-12)
        assert stats[name]["frame_energy"] == pytest.approx(
            expected.frame.energy / expected.frame.total_energy, abs=1e-6
        )
        assert stats[name]["kept_energy"] == pytest.approx(expected.kept_energy, abs=1e-6)


def test_peft_loads_merged_adapter(merged_default, three, load_base):
    from peft import PeftModel

    inputs = inputs_of(three)
    deltas = {name: ctm_ta(As, Bs, scales, 8).delta for name, (As, Bs, scales) in inputs.items()}

    plain = load_base()
    with torch.no_grad():
        for name, delta in deltas.items():
            plain.get_submodule(name.removeprefix(PREFIX)).weight += torch.from_numpy(delta).to(torch.float32)
    input_ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [63, 2, 40, 7, 7, 33, 0, 11]])

    peft_model = PeftModel.from_pretrained(load_base(), merged_default).eval()
    with torch.no_grad():
        expected = plain(input_ids).logits
        got = peft_model(input_ids).logits
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(got, expected, atol=1e-4 * scale, rtol=0)

    base = load_base()
    merged = peft_model.merge_and_unload()
    merged_state, base_state = merged.state_dict(), base.state_dict()
    assert set(merged_state) == set(base_state)
    for key, value in merged_state.items():
        module = PREFIX + key.removesuffix(".weight")
        if module in deltas:
            want = base_state[key].to(torch.float64).numpy() + deltas[module]
            np.testing.assert_allclose(
                value.to(torch.float64).numpy(), want, rtol=0, atol=1e-5 * np.abs(deltas[module]).max(), err_msg=key
            )
        else:
            torch.testing.assert_close(value, base_state[key], rtol=0, atol=0, msg=key)


def test_rank_at_least_total_rank_is_exact(make_adapter, tmp_path):
    folders = [make_adapter(r=4, alpha=8, seed=4), make_adapter(r=4, alpha=8, seed=5)]
    out = tmp_path / "out"
    result = run_ctm("merge", *folders, "--rank", "8", *PAPER_TA, "-o", out)
    assert result.exit_code == 0, result.stderr
    written = written_deltas(out)
    for name, (As, Bs, scales) in inputs_of(folders).items():
        assert relative(written[name], exact_sum(As, Bs, scales)) < 1e-5, name
    report = json.loads((out / "merge_report.json").read_text())
    assert max(m["relative_error"] for m in report["modules"]) < 1e-5


@pytest.mark.parametrize("custom", [False, True], ids=["defaults", "weights-lambda"])
def test_cat_is_exact_sum_at_total_rank(three, tmp_path, custom):
    out = tmp_path / "out"
    extra = ["--weights", "1,-0.5,2", "--lambda", "0.7"] if custom else []
    result = run_ctm("merge", *three, "--method", "cat", "-o", out, *extra)
    assert result.exit_code == 0, result.stderr
    total = sum(r for r, *_ in THREE)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == total
    written = written_deltas(out)
    _, modules = read_adapter(out)
    weights, lam = (CUSTOM["weights"], CUSTOM["lam"]) if custom else (None, 1.0)
    for name, (As, Bs, scales) in inputs_of(three).items():
        assert modules[name][0].shape[0] == total
        assert relative(written[name], exact_sum(As, Bs, scales, weights, lam)) < 1e-5, name


def test_merge_report(merged_default, three):
    report = json.loads((merged_default / "merge_report.json").read_text())
    assert len(report["inputs"]) == 3
    for item, folder in zip(report["inputs"], three, strict=True):
        assert item["sha256"] == hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
        assert item["base_model"] == "tiny-llama"
    assert report["settings"]["method"] == "ctm" and report["settings"]["written_rank"] == 8

    written = written_deltas(merged_default)
    inputs = inputs_of(three)
    assert sorted(m["name"] for m in report["modules"]) == sorted(inputs)
    for module in report["modules"]:
        kept = module["kept_energy"]
        assert len(kept) == 3
        assert all(0.0 <= k <= 1.0 for k in kept), module["name"]
        exact = exact_sum(*inputs[module["name"]])
        assert module["relative_error"] == pytest.approx(relative(written[module["name"]], exact), abs=1e-6)
        assert module["written_rank"] == 8

    markdown = (merged_default / "merge_report.md").read_text()
    assert markdown.strip()
    assert len(markdown.splitlines()) < 60


def to_bfloat16(folder: Path, target: Path) -> Path:
    """A copy of an adapter folder with every tensor stored as bfloat16."""
    shutil.copytree(folder, target)
    tensors = {key: value.to(torch.bfloat16).contiguous() for key, value in load_file(str(folder / WEIGHTS)).items()}
    save_file(tensors, str(target / WEIGHTS), metadata={"format": "pt"})
    return target


def test_bfloat16_inputs(three, tmp_path):
    folders = [to_bfloat16(folder, tmp_path / f"bf16-{i}") for i, folder in enumerate(three)]
    assert all(stored_dtypes(folder) == {"BF16"} for folder in folders)
    inputs = inputs_of(folders)  # the bfloat16 values, exactly, in float64
    expected = {name: ctm_ta(As, Bs, scales, 8).delta for name, (As, Bs, scales) in inputs.items()}

    result = run_ctm("merge", *folders, "--rank", "8", *PAPER_TA, "-o", tmp_path / "bf16")
    assert result.exit_code == 0, result.stderr
    assert stored_dtypes(tmp_path / "bf16") == {"BF16"}
    written = written_deltas(tmp_path / "bf16")
    for name, delta in expected.items():
        assert relative(written[name], delta) < 2e-2, name

    result = run_ctm("merge", *folders, "--rank", "8", *PAPER_TA, "--dtype", "float32", "-o", tmp_path / "f32")
    assert result.exit_code == 0, result.stderr
    assert stored_dtypes(tmp_path / "f32") == {"F32"}
    written = written_deltas(tmp_path / "f32")
    for name, delta in expected.items():
        assert relative(written[name], delta) < 1e-4, name


PATTERNED = {"targets": ("q_proj", "v_proj"), "rank_pattern": {"q_proj": 6}}


def test_rank_pattern_inputs(make_adapter, tmp_path, load_base):
    from peft import PeftModel

    folders = [make_adapter(r=4, alpha=8, seed=6, **PATTERNED), make_adapter(r=4, alpha=8, seed=7, **PATTERNED)]
    inputs = inputs_of(folders)
    assert {a.shape[0] for name, (As, _, _) in inputs.items() if "q_proj" in name for a in As} == {6}
    out = tmp_path / "out"
    result = run_ctm("merge", *folders, "--rank", "4", *PAPER_TA, "-o", out)
    assert result.exit_code == 0, result.stderr
    written = written_deltas(out)
    for name, (As, Bs, scales) in inputs.items():
        assert relative(written[name], ctm_ta(As, Bs, scales, 4).delta) < 1e-4, name
    PeftModel.from_pretrained(load_base(), out)


def test_cat_with_rank_pattern_inputs_loads_in_peft(make_adapter, tmp_path, load_base):
    from peft import PeftModel

    folders = [make_adapter(r=4, alpha=8, seed=6, **PATTERNED), make_adapter(r=4, alpha=8, seed=7, **PATTERNED)]
    out = tmp_path / "out"
    result = run_ctm("merge", *folders, "--method", "cat", "-o", out)
    assert result.exit_code == 0, result.stderr
    written = written_deltas(out)
    for name, (As, Bs, scales) in inputs_of(folders).items():
        assert relative(written[name], exact_sum(As, Bs, scales)) < 1e-5, name
    PeftModel.from_pretrained(load_base(), out)
