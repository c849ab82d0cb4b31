"""Single-file LoRAs (ctm_cli/formats): kohya, diffusers and LyCORIS files merged and checked against float64 dense
references, written back in their style, and the refusals (mismatched keys, DoRA/OFT/IA3/GLoRA, formats that cannot
be written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fails, relative, run_ctm
from lora_files import (
    FLUX_DIFFUSERS,
    FLUX_KOHYA,
    SD15_DIFFUSERS,
    SD15_KOHYA,
    SDXL_DIFFUSERS,
    SDXL_KOHYA,
    dense_updates,
    read_tensors,
    write_lora_file,
)
from safetensors import safe_open
from safetensors.torch import save_file

from ctm_cli.errors import EXIT_INCOMPATIBLE, EXIT_USAGE
from ctm_cli.formats import FORMATS
from ctm_cli.recipe import OUTPUT_FORMATS

KEY_SETS = {
    "sd15-kohya": (SD15_KOHYA, "kohya"),
    "sdxl-kohya": (SDXL_KOHYA, "kohya"),
    "flux-kohya": (FLUX_KOHYA, "kohya"),
    "sd15-diffusers": (SD15_DIFFUSERS, "diffusers"),
    "sdxl-diffusers": (SDXL_DIFFUSERS, "diffusers"),
    "flux-diffusers": (FLUX_DIFFUSERS, "diffusers"),
}


def merge(tmp_path: Path, inputs: list[Path], *options: str, name: str = "merged") -> Path:
    """Run `ctm merge` on the CPU and return the output folder (fails the test on an error)."""
    output = tmp_path / name
    result = run_ctm("merge", *inputs, "-o", output, "--device", "cpu", "--quiet", *options)
    assert result.exit_code == 0, result.stderr
    return output


def exact_sum(inputs: list[Path], weights: list[float] | None = None) -> dict[str, np.ndarray]:
    """Σ w_t ΔW_t per module, float64, from the files."""
    updates = [dense_updates(path) for path in inputs]
    weights = weights or [1.0] * len(inputs)
    return {name: sum(w * update[name] for w, update in zip(weights, updates, strict=True)) for name in updates[0]}


def assert_close(merged: dict[str, np.ndarray], expected: dict[str, np.ndarray], tolerance: float = 1e-5) -> None:
    assert sorted(merged) == sorted(expected)
    for name, value in expected.items():
        assert relative(merged[name], value) < tolerance, name


def test_the_format_choices_are_the_registry():
    assert OUTPUT_FORMATS == FORMATS


@pytest.mark.parametrize("key_set", sorted(KEY_SETS))
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_cat_of_single_files_is_their_exact_sum_in_their_own_style(tmp_path, key_set, alpha):
    modules, style = KEY_SETS[key_set]
    inputs = [
        write_lora_file(tmp_path / f"{seed}.safetensors", modules, rank, seed, alpha, style)
        for seed, rank in ((1, 4), (2, 8))
    ]
    output = merge(tmp_path, inputs, "--method", "cat", "--weights", "1,0.5")
    assert_close(dense_updates(output), exact_sum(inputs, [1.0, 0.5]))
    tensors, metadata = read_tensors(output / "merged.safetensors")
    assert not (output / "adapter_config.json").exists()
    if style == "kohya":
        assert metadata["ss_network_module"] == "networks.lora"
        assert metadata["ss_network_dim"] == "12" and metadata["ss_network_alpha"] == "12.0"
        assert all(float(tensors[f"{name}.alpha"]) == 12.0 for name in modules)
    else:
        assert not any(key.endswith(".alpha") for key in tensors)
    for name, shape in modules.items():  # convolutions keep their kernel layout
        down = tensors[f"{name}.lora_down.weight" if style == "kohya" else f"{name}.lora_A.weight"]
        assert down.shape == (12, *shape[1:])


def test_an_alpha_of_zero_means_scale_one_as_in_kohya(tmp_path):
    pairs = ((1, 0.0), (2, 8.0))
    inputs = [write_lora_file(tmp_path / f"{s}.safetensors", FLUX_KOHYA, 4, s, alpha) for s, alpha in pairs]
    output = merge(tmp_path, inputs, "--method", "cat")
    first = write_lora_file(tmp_path / "same.safetensors", FLUX_KOHYA, 4, 1, None)
    assert_close(dense_updates(output), exact_sum([first, inputs[1]]))


def test_mtc_equals_kohyas_dense_svd_merge(tmp_path):
    """kohya's svd_merge_lora: the dense sum, truncated to rank r by SVD; ctm's mtc gives it from the cores."""
    inputs = [write_lora_file(tmp_path / f"{s}.safetensors", SDXL_KOHYA, 8, s, 4.0) for s in (1, 2, 3)]
    output = merge(tmp_path, inputs, "--method", "mtc", "--rule", "ta", "--rank", "6")
    expected = {}
    for name, total in exact_sum(inputs).items():
        u, s, vt = np.linalg.svd(total, full_matrices=False)
        expected[name] = (u[:, :6] * s[:6]) @ vt[:6]
    assert_close(dense_updates(output), expected, 1e-4)


def test_kohya_round_trip_loads_and_merges_again(tmp_path):
    first = [write_lora_file(tmp_path / f"{s}.safetensors", SD15_KOHYA, 4, s, 1.0) for s in (1, 2)]
    merged = merge(tmp_path, first, "--rank", "4")
    tensors, metadata = read_tensors(merged / "merged.safetensors")
    suffixes = ("lora_down.weight", "lora_up.weight", "alpha")
    expected_keys = {f"{name}.{suffix}" for name in SD15_KOHYA for suffix in suffixes}
    assert set(tensors) == expected_keys
    for name, (out, *rest) in SD15_KOHYA.items():
        ones = (1,) * (len(rest) - 1)
        assert tensors[f"{name}.lora_up.weight"].shape == (out, 4, *ones)
        assert tensors[f"{name}.lora_down.weight"].shape == (4, *rest)
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}  # the 3×3 conv
    third = write_lora_file(tmp_path / "3.safetensors", SD15_KOHYA, 8, 3, None)
    again = merge(tmp_path, [merged, third], "--method", "cat", name="again")  # the output folder is an input
    assert_close(dense_updates(again), exact_sum([merged, third]))


LYCORIS_KINDS = {
    "tucker": (40, 24, 3, 3),
    "loha": (40, 32),
    "loha_conv": (40, 24, 3, 3),
    "loha_tucker": (40, 24, 3, 3),
    "lokr": (40, 32),
    "lokr_conv": (40, 24, 3, 3),
    "lokr_full": (40, 32),
    "lokr_both": (40, 32),
    "lokr_tucker": (40, 24, 3, 3),
}


@pytest.mark.parametrize("alpha", [None, 3.0])
def test_lycoris_modules_merge_exactly(tmp_path, alpha):
    """LoCon-Tucker, LoHa and LoKr (linear and conv): their exact lifts, merged with cat, give the exact sum."""
    modules = {f"lora_unet_{kind}": shape for kind, shape in LYCORIS_KINDS.items()}
    kinds = {f"lora_unet_{kind}": kind.removesuffix("_conv") for kind in LYCORIS_KINDS}
    inputs = [write_lora_file(tmp_path / f"{s}.safetensors", modules, 4, s, alpha, kinds=kinds) for s in (1, 2)]
    inputs.append(write_lora_file(tmp_path / "plain.safetensors", modules, 4, 3, alpha))
    output = merge(tmp_path, inputs, "--method", "cat")
    assert_close(dense_updates(output), exact_sum(inputs))
    report = json.loads((output / "merge_report.json").read_text())
    ranks = {m["name"]: m["ranks"] for m in report["modules"]}
    assert ranks["lora_unet_loha"][0] == 16  # r × r: the Hadamard product's exact lift
    assert ranks["lora_unet_lokr_full"][0] == 32  # capped at min(out, in): the product itself


def test_lycoris_merge_with_ctm_matches_the_dense_reference_at_full_rank(tmp_path):
    """ctm's default method, asked for the full rank of the lifted updates (2 × 2 per LoHa), gives their exact sum."""
    modules = {"lora_unet_a": (40, 32), "lora_unet_b": (40, 24, 3, 3)}
    kinds = {"lora_unet_a": "loha", "lora_unet_b": "loha_tucker"}
    inputs = [write_lora_file(tmp_path / f"{s}.safetensors", modules, 2, s, 1.0, kinds=kinds) for s in (1, 2)]
    output = merge(tmp_path, inputs, "--rule", "ta", "--rank", "8")
    assert_close(dense_updates(output), exact_sum(inputs), 1e-4)


@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("dora_scale", "DoRA"),
        ("oft_blocks", "OFT"),
        ("on_input", "IA3"),
        ("a1.weight", "GLoRA"),
        ("diff", "full weight difference"),
    ],
)
def test_base_dependent_adapters_are_refused_saying_why(tmp_path, key, what):
    bad = write_lora_file(tmp_path / "bad.safetensors", FLUX_KOHYA, 4, 1)
    tensors, _ = read_tensors(bad)
    extra = {f"lora_unet_double_blocks_0_img_attn_qkv.{key}": np.ones((1, 32))}
    save_file({k: torch.from_numpy(v).float() for k, v in {**tensors, **extra}.items()}, str(bad))
    good = write_lora_file(tmp_path / "good.safetensors", FLUX_KOHYA, 4, 2)
    stderr = fails(["merge", good, bad, "-o", tmp_path / "out"], EXIT_INCOMPATIBLE, tmp_path)
    assert what in stderr and "lora_unet_double_blocks_0_img_attn_qkv" in stderr
    assert "base weight" in stderr or "not a low-rank adapter" in stderr


def test_mismatched_module_names_are_refused_naming_them(tmp_path):
    first = write_lora_file(tmp_path / "a.safetensors", SD15_KOHYA, 4, 1)
    second = write_lora_file(tmp_path / "b.safetensors", SDXL_KOHYA, 4, 2)
    stderr = fails(["merge", first, second, "-o", tmp_path / "out"], EXIT_INCOMPATIBLE, tmp_path)
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in stderr or "lora_te1_text_model" in stderr


def test_diffusers_and_kohya_files_merge_under_kohya_names(tmp_path):
    kohya = write_lora_file(tmp_path / "k.safetensors", SD15_KOHYA, 4, 1, 2.0)
    diffusers = write_lora_file(tmp_path / "d.safetensors", SD15_DIFFUSERS, 4, 2, None, "diffusers")
    output = merge(tmp_path, [diffusers, kohya], "--method", "cat")
    renamed = {
        "lora_" + name.replace("text_encoder.", "te_").replace("unet.", "unet_").replace(".", "_"): value
        for name, value in dense_updates(diffusers).items()
    }
    expected = {name: value + renamed[name] for name, value in dense_updates(kohya).items()}
    assert_close(dense_updates(output), expected)
    assert "merged.safetensors" in {path.name for path in output.iterdir()}
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in read_tensors(output / "merged.safetensors")[0]


def test_unmappable_diffusers_names_are_refused_naming_them(tmp_path):
    kohya = write_lora_file(tmp_path / "k.safetensors", FLUX_KOHYA, 4, 1)
    diffusers = write_lora_file(tmp_path / "d.safetensors", FLUX_DIFFUSERS, 4, 2, None, "diffusers")
    stderr = fails(["merge", kohya, diffusers, "-o", tmp_path / "out"], EXIT_INCOMPATIBLE, tmp_path)
    assert "transformer.transformer_blocks.0.attn.to_q" in stderr or "lora_unet_double_blocks_0" in stderr


def test_format_kohya_writes_diffusers_inputs_with_kohya_names(tmp_path):
    inputs = [write_lora_file(tmp_path / f"{s}.safetensors", SDXL_DIFFUSERS, 4, s, 8.0, "diffusers") for s in (1, 2)]
    output = merge(tmp_path, inputs, "--method", "cat", "--format", "kohya")
    written = dense_updates(output)
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in written
    assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj" in written
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k" in written


@pytest.mark.parametrize(("style", "modules", "fmt"), [
    ("kohya", SD15_KOHYA, "diffusers"),
    ("kohya", SD15_KOHYA, "peft"),
    ("diffusers", FLUX_DIFFUSERS, "kohya"),
])  # fmt: skip
def test_formats_the_names_cannot_be_written_in_are_refused(tmp_path, style, modules, fmt):
    inputs = [write_lora_file(tmp_path / f"{s}.safetensors", modules, 4, s, None, style) for s in (1, 2)]
    stderr = fails(["merge", *inputs, "-o", tmp_path / "out", "--format", fmt], EXIT_USAGE, tmp_path)
    assert f"--format {fmt}" in stderr


def test_peft_adapters_are_not_written_as_kohya(tmp_path, make_adapter):
    folders = [make_adapter(r=4, seed=seed) for seed in (1, 2)]
    stderr = fails(["merge", *folders, "-o", tmp_path / "out", "--format", "kohya"], EXIT_USAGE, tmp_path)
    assert "the inputs are peft" in stderr


def test_a_peft_folder_and_a_single_file_are_refused_together(tmp_path, make_adapter):
    single = write_lora_file(tmp_path / "k.safetensors", SD15_KOHYA, 4, 1)
    stderr = fails(["merge", make_adapter(r=4, seed=1), single, "-o", tmp_path / "out"], EXIT_INCOMPATIBLE, tmp_path)
    assert "is peft" in stderr and "is kohya" in stderr


def test_a_folder_with_several_files_is_refused(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    for seed in (1, 2):
        write_lora_file(folder / f"{seed}.safetensors", SD15_KOHYA, 4, seed)
    stderr = fails(["merge", folder, folder / "1.safetensors", "-o", tmp_path / "out"], 3, tmp_path)
    assert "holds 2 .safetensors files" in stderr


def test_half_precision_files_merge_and_keep_their_dtype(tmp_path):
    inputs = [
        write_lora_file(tmp_path / f"{s}.safetensors", SD15_KOHYA, 4, s, 4.0, dtype=torch.float16) for s in (1, 2)
    ]
    output = merge(tmp_path, inputs, "--method", "cat")
    with safe_open(str(output / "merged.safetensors"), "pt") as handle:
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys() if not key.endswith(".alpha")}  # noqa: SIM118
    assert dtypes == {"F16"}
    assert_close(dense_updates(output), exact_sum(inputs), 2e-3)


def _recipe(tmp_path: Path, inputs: list[Path], extra: str) -> Path:
    adapters = "".join(f"  - source: {path}\n" for path in inputs)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"adapters:\n{adapters}method: cat\n{extra}")
    return path


def test_module_weights_scale_each_adapters_update_of_the_modules_they_match(tmp_path):
    inputs = [write_lora_file(tmp_path / f"{s}.safetensors", SD15_KOHYA, 4, s, 2.0) for s in (1, 2)]
    recipe = _recipe(tmp_path, inputs, "module_weights:\n  _te_: [1, 0]\n  down_blocks: [0.5, 2]\n  attn: [3, 3]\n")
    output = merge(tmp_path, [], "--config", recipe)
    first, second = (dense_updates(path) for path in inputs)
    weights = {"_te_": (1.0, 0.0), "down_blocks": (0.5, 2.0), "attn": (3.0, 3.0)}  # the first pattern found wins
    expected = {}
    for name in SD15_KOHYA:
        w1, w2 = next((w for pattern, w in weights.items() if pattern in name), (1.0, 1.0))
        expected[name] = w1 * first[name] + w2 * second[name]
    assert_close(dense_updates(output), expected)
    report = json.loads((output / "merge_report.json").read_text())
    assert report["settings"]["module_weights"] == {
        "_te_": {"weights": [1.0, 0.0], "modules": 1},
        "down_blocks": {"weights": [0.5, 2.0], "modules": 3},
        "attn": {"weights": [3.0, 3.0], "modules": 1},
    }
    assert report["recipe"]["module_weights"] == {"_te_": [1.0, 0.0], "down_blocks": [0.5, 2.0], "attn": [3.0, 3.0]}
    assert "module_weights:" in (output / "recipe.yaml").read_text()


@pytest.mark.parametrize(("entry", "message"), [
    ("  _te_: [1, 0, 1]\n", "has 3 weights but there are 2 adapters"),
    ("  vae: [1, 0]\n", "matches no module"),
    ("  (a+)+b: [1, 0]\n", "pattern refused"),
    ("  _te_: 1\n", "expected one weight per adapter"),
])  # fmt: skip
def test_bad_module_weights_are_refused(tmp_path, entry, message):
    inputs = [write_lora_file(tmp_path / f"{s}.safetensors", SD15_KOHYA, 4, s) for s in (1, 2)]
    recipe = _recipe(tmp_path, inputs, f"module_weights:\n{entry}")
    stderr = fails(["merge", "--config", recipe, "-o", tmp_path / "out"], EXIT_USAGE, tmp_path)
    assert message in stderr


def test_inspect_shows_the_style_kinds_and_blocks(tmp_path):
    kinds = {"lora_unet_down_blocks_0_resnets_0_conv1": "loha"}
    path = write_lora_file(tmp_path / "l.safetensors", SD15_KOHYA, 4, 1, 1.0, kinds=kinds)
    result = run_ctm("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["style"] == "kohya"
    assert info["kinds"] == {"lora": 4, "loha": 1}
    assert info["blocks"] == {"te.text_model_encoder_layers": 1, "unet.down_blocks": 3, "unet.up_blocks": 1}
    diffusers = write_lora_file(tmp_path / "d.safetensors", SDXL_DIFFUSERS, 4, 1, None, "diffusers")
    info = json.loads(run_ctm("inspect", diffusers, "--json").stdout)
    assert info["style"] == "diffusers"
    assert info["blocks"] == {"text_encoder.text_model": 1, "text_encoder_2.text_model": 1, "unet.down_blocks": 1}
    table = run_ctm("inspect", diffusers).stdout
    assert "diffusers" in table and "unet.down_blocks" in table


def test_the_model_card_of_a_kohya_merge_describes_a_kohya_file(tmp_path):
    inputs = [write_lora_file(tmp_path / f"{s}.safetensors", SD15_KOHYA, 4, s) for s in (1, 2)]
    card = (merge(tmp_path, inputs, "--rank", "4") / "README.md").read_text()
    assert "kohya-style LoRA file" in card and "PeftModel" not in card and "library_name" not in card


def test_older_diffusers_keys_read_like_lora_a_and_b(tmp_path):
    modern = write_lora_file(tmp_path / "modern.safetensors", SD15_DIFFUSERS, 4, 1, 2.0, "diffusers")
    tensors, _ = read_tensors(modern)
    older = {
        key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): value
        for key, value in tensors.items()
    }
    older_path = tmp_path / "older.safetensors"
    save_file({key: torch.from_numpy(value).float() for key, value in older.items()}, str(older_path))
    other = write_lora_file(tmp_path / "other.safetensors", SD15_DIFFUSERS, 4, 2, None, "diffusers")
    output = merge(tmp_path, [older_path, other], "--method", "cat")
    assert_close(dense_updates(output), exact_sum([modern, other]))
