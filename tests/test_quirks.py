"""Real-world adapter quirks: modules_to_save heads, GPT-2 Conv1D (fan_in_fan_out), target_modules spelled
differently, different module sets, embedding LoRA, unsupported LoRA variants, and mixed dtypes.

Merged updates are checked against the float64 reference (tests/reference.py), and every written adapter
that can be is loaded back with PEFT and its forward pass compared with the base model plus those updates."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    PREFIX,
    REAL_ADAPTERS,
    WEIGHTS,
    fails,
    inputs_of,
    needs_shared,
    read_adapter,
    relative,
    run_ctm,
    save_peft_adapter,
    stored_dtypes,
    written_deltas,
)
from reference import ctm_ta
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ctm_cli.methods import METHODS

GPT2_A, GPT2_B = REAL_ADAPTERS / "gpt2-c_attn-a", REAL_ADAPTERS / "gpt2-c_attn-b"
DISTILBERT = REAL_ADAPTERS / "distilbert-imdb"
SCORE = "base_model.model.score.weight"
TOKENS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [63, 2, 40, 7, 7, 33, 0, 11]])
TOLERANCE = 1e-5  # relative error of a float32 merge against the float64 reference


def merge(*args) -> None:
    """`ctm merge ARGS`, with DESIGN's CtM-TA (the ta rule in a frame of the output rank) unless ARGS name a rule:
    these tests compare with the CtM-TA reference."""
    ctm = "--method" not in args or args[args.index("--method") + 1] == "ctm"
    rule = () if "--rule" in args else ("--rule", "ta", *(("--param", "frame_rank=1") if ctm else ()))
    result = run_ctm("merge", *args, *rule)
    assert result.exit_code == 0, result.stderr


def config_of(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def report_of(folder: Path) -> dict:
    return json.loads((folder / "merge_report.json").read_text())


def writable_copy(folder: Path, target: Path) -> Path:
    """A copy of a (read-only) adapter folder whose files can be changed."""
    return Path(shutil.copytree(folder, target, copy_function=shutil.copyfile))


def check_against_reference(inputs: list[Path], out: Path, rank: int, weights=None, lam: float = 1.0) -> None:
    """Every written ΔW equals the float64 CtM-TA reference of the inputs (missing modules as rank 0)."""
    written = written_deltas(out)
    expected = inputs_of(inputs)
    assert sorted(written) == sorted(expected)
    for name, (As, Bs, scales) in expected.items():
        reference = ctm_ta(As, Bs, scales, min(rank, sum(a.shape[0] for a in As)), weights, lam).delta
        assert relative(written[name], reference) < TOLERANCE, name


def lora_modules(peft_model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}


def add_delta(model, name: str, delta: np.ndarray) -> None:
    """Add ΔW (out × in) to a module's weight, transposed where the weight is stored in × out."""
    from transformers.pytorch_utils import Conv1D

    module = model.get_submodule(name.removeprefix(PREFIX))
    stored_transposed = isinstance(module, Conv1D | torch.nn.Embedding)
    module.weight += torch.from_numpy(delta.T if stored_transposed else delta).to(module.weight.dtype)


def check_peft_forward(base: Callable[[], torch.nn.Module], out: Path, replaced: dict | None = None) -> None:
    """PEFT loads `out`, wraps exactly its modules, and computes what base + written ΔW (+ replaced heads) does."""
    from peft import PeftModel

    deltas = written_deltas(out)
    manual = base()
    with torch.no_grad():
        for name, delta in deltas.items():
            add_delta(manual, name, delta)
        for key, tensor in (replaced or {}).items():
            manual.get_parameter(key.removeprefix(PREFIX)).copy_(tensor)
    peft_model = PeftModel.from_pretrained(base(), out).eval()
    assert lora_modules(peft_model) == set(deltas)
    with torch.no_grad():
        expected, got, plain = manual(TOKENS).logits, peft_model(TOKENS).logits, base()(TOKENS).logits
    tolerance = 1e-5 * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)
    assert float((expected - plain).abs().max()) > 1000 * tolerance  # the update is large enough to be seen


# ---------------------------------------------------------------- tiny base models


@pytest.fixture(scope="module")
def gpt2() -> torch.nn.Module:
    """A tiny GPT-2 (Conv1D layers) from a transformers config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2_adapter(gpt2, tmp_path_factory) -> Callable[..., Path]:
    """gpt2_adapter(seed, **lora_options) -> a real PEFT LoRA folder on the tiny GPT-2 (fan_in_fan_out)."""

    def make(seed: int, **lora_options) -> Path:
        folder = tmp_path_factory.mktemp(f"gpt2-{seed}")
        return save_peft_adapter(
            gpt2, folder, seed, "tiny-gpt2", r=4, lora_alpha=8, fan_in_fan_out=True, **lora_options
        )

    return make


# ---------------------------------------------------------------- modules_to_save


@needs_shared
def test_modules_to_save_refused_by_default_naming_tensors_and_choices(out_parent):
    line = fails(["merge", GPT2_A, GPT2_B, "-o", out_parent / "out", "--rank", "8"], 4, out_parent)
    assert str(GPT2_A / WEIGHTS) in line and SCORE in line
    assert "--modules-to-save drop|first|mean" in line


@needs_shared
def test_real_gpt2_fan_in_fan_out_drop(tmp_path):
    """Two real GPT-2 adapters (Conv1D c_attn, fan_in_fan_out): ΔW against the float64 reference."""
    out = tmp_path / "out"
    merge(GPT2_A, GPT2_B, "--rank", "8", "--modules-to-save", "drop", "-o", out)
    check_against_reference([GPT2_A, GPT2_B], out, 8)
    config = config_of(out)
    assert config["fan_in_fan_out"] is True
    assert config["modules_to_save"] is None
    assert config["task_type"] is None  # SEQ_CLS without its head would not load in PEFT (test_bad_inputs_loading)
    assert config["target_modules"] == ["c_attn"]
    assert SCORE not in load_file(str(out / WEIGHTS))
    assert report_of(out)["extra_tensors"] == [{"key": SCORE, "action": "dropped", "from": [str(GPT2_A), str(GPT2_B)]}]


@needs_shared
@pytest.mark.parametrize("policy", ["first", "mean"])
def test_real_gpt2_score_head_first_and_mean(tmp_path, policy):
    out = tmp_path / "out"
    merge(GPT2_A, GPT2_B, "--rank", "4", "--modules-to-save", policy, "-o", out)
    heads = [load_file(str(folder / WEIGHTS))[SCORE] for folder in (GPT2_A, GPT2_B)]
    assert heads[0].shape == heads[1].shape == (6, 768)  # both six-class heads
    want = heads[0] if policy == "first" else ((heads[0].double() + heads[1].double()) / 2).float()
    assert torch.equal(load_file(str(out / WEIGHTS))[SCORE], want)
    assert config_of(out)["modules_to_save"] == ["score"]  # PEFT saved `score` without listing it
    if policy == "mean":  # GPT-2's architecture (random weights: the base model cannot be downloaded here)
        from transformers import GPT2Config, GPT2ForSequenceClassification

        torch.manual_seed(0)
        base = GPT2ForSequenceClassification(GPT2Config(num_labels=6, pad_token_id=0)).eval()
        check_peft_forward(lambda: copy.deepcopy(base), out, replaced={SCORE: want})


@needs_shared
def test_mean_of_heads_with_different_shapes_is_refused(tmp_path, out_parent):
    two_classes = writable_copy(GPT2_B, tmp_path / "gpt2-two-classes")
    tensors = load_file(str(two_classes / WEIGHTS))
    tensors[SCORE] = tensors[SCORE][:2].contiguous()
    save_file(tensors, str(two_classes / WEIGHTS))
    args = ["merge", GPT2_A, two_classes, "-o", out_parent / "out", "--rank", "4", "--modules-to-save", "mean"]
    line = fails(args, 4, out_parent)
    assert str(two_classes / WEIGHTS) in line and SCORE in line
    assert "2×768" in line and "6×768" in line and "first or drop" in line
    merge(GPT2_A, two_classes, "--rank", "4", "--modules-to-save", "first", "-o", out_parent / "out")
    assert load_file(str(out_parent / "out" / WEIGHTS))[SCORE].shape == (6, 768)


@needs_shared
def test_real_distilbert_heads_kept(tmp_path):
    out = tmp_path / "out"
    merge(DISTILBERT, DISTILBERT, "--rank", "8", "--modules-to-save", "mean", "-o", out)
    original, written = load_file(str(DISTILBERT / WEIGHTS)), load_file(str(out / WEIGHTS))
    heads = [key for key in original if "lora_" not in key]
    assert sorted(heads) == sorted(
        PREFIX + f"{m}.{p}" for m in ("classifier", "pre_classifier") for p in ("weight", "bias")
    )
    for key in heads:
        assert torch.equal(written[key], original[key]), key
    # `classifier` also covers pre_classifier (PEFT matches by suffix), so nothing is added to the list.
    assert config_of(out)["modules_to_save"] == ["classifier", "score"]


def head_trained(folder: Path, key: str, seed: int) -> torch.Tensor:
    """Stand in for training a modules_to_save head: perturb its saved copy; returns the new value."""
    tensors = load_file(str(folder / WEIGHTS))
    tensors[key] = tensors[key] + 0.1 * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(seed))
    save_file(tensors, str(folder / WEIGHTS))
    return tensors[key]


def test_peft_modules_to_save_mean_loads_in_peft(tiny_llama_model, load_base, tmp_path):
    """Three adapters with a trained lm_head (modules_to_save), one stored in bfloat16: the mean head is float32."""
    lm_head = PREFIX + "lm_head.weight"
    folders = []
    for seed in (41, 42, 43):
        folder = tmp_path / f"adapter-{seed}"
        options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
        folders.append(save_peft_adapter(tiny_llama_model, folder, seed, "tiny-llama", **options))
        head_trained(folder, lm_head, seed)
    folders[2] = stored_as(folders[2], tmp_path / "bf16", torch.bfloat16)
    out = tmp_path / "out"
    merge(*folders, "--rank", "6", "--modules-to-save", "mean", "-o", out)
    check_against_reference(folders, out, 6)
    mean = (sum(load_file(str(folder / WEIGHTS))[lm_head].double() for folder in folders) / 3).float()
    assert torch.equal(load_file(str(out / WEIGHTS))[lm_head], mean)
    assert config_of(out)["modules_to_save"] == ["lm_head"]
    check_peft_forward(load_base, out, replaced={lm_head: mean})


# ---------------------------------------------------------------- GPT-2 Conv1D, target_modules spellings


def test_tiny_gpt2_fan_in_fan_out_loads_in_peft(gpt2, gpt2_adapter, tmp_path):
    folders = [gpt2_adapter(seed, target_modules=["c_attn", "c_proj", "c_fc"]) for seed in (51, 52)]
    out = tmp_path / "out"
    merge(*folders, "--rank", "5", "--weights", "1,-0.7", "-o", out)
    check_against_reference(folders, out, 5, weights=[1.0, -0.7])
    config = config_of(out)
    assert config["fan_in_fan_out"] is True
    assert config["target_modules"] == config_of(folders[0])["target_modules"]  # all agree: kept as written
    check_peft_forward(lambda: copy.deepcopy(gpt2), out)


@pytest.mark.parametrize(
    "spellings",
    [(["c_attn"], ["attn.c_attn"]), (["c_attn"], r".*\.attn\.c_attn"), (r".*h\.\d\.attn\.c_attn", ["c_attn"])],
    ids=["suffix-vs-path", "list-vs-regex", "regex-vs-list"],
)
def test_target_modules_spelled_differently(gpt2, gpt2_adapter, tmp_path, spellings):
    folders = [gpt2_adapter(53 + i, target_modules=spelling) for i, spelling in enumerate(spellings)]
    out = tmp_path / "out"
    merge(*folders, "--rank", "4", "-o", out)
    config = config_of(out)
    assert config["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    check_against_reference(folders, out, 4)
    check_peft_forward(lambda: copy.deepcopy(gpt2), out)


# ---------------------------------------------------------------- different module sets


def test_different_module_sets_refused_naming_modules(make_adapter, out_parent):
    a = make_adapter(r=4, alpha=8, seed=61, targets=("q_proj", "v_proj"))
    b = make_adapter(r=4, alpha=8, seed=62, targets=("q_proj", "k_proj"))
    line = fails(["merge", a, b, "-o", out_parent / "out", "--rank", "4"], 4, out_parent)
    assert f"{b}: has no module base_model.model.model.layers.0.self_attn.v_proj" in line
    assert str(a) in line and "--allow-missing" in line


def test_allow_missing_merges_zero_updates(make_adapter, load_base, tmp_path):
    """q_proj in both, v_proj only in a, k_proj only in b; with the mean rule a missing module counts as a
    zero update (v_proj = w_a ΔW_a / (w_a + w_b)), not as an absent adapter."""
    folders = [
        make_adapter(r=4, alpha=8, seed=61, targets=("q_proj", "v_proj")),
        make_adapter(r=4, alpha=8, seed=62, targets=("q_proj", "k_proj")),
    ]
    out = tmp_path / "out"
    paper_mean = ["--rule", "mean", "--param", "frame_rank=1"]
    merge(*folders, "--rank", "3", "--allow-missing", *paper_mean, "--weights", "1,0.5", "-o", out)
    check_against_reference(folders, out, 3, weights=[1.0, 0.5], lam=1 / 1.5)
    report = report_of(out)
    layers = [f"base_model.model.model.layers.{i}.self_attn" for i in (0, 1)]
    assert [item["missing_modules"] for item in report["inputs"]] == [
        [f"{layer}.k_proj" for layer in layers],
        [f"{layer}.v_proj" for layer in layers],
    ]
    markdown = (out / "merge_report.md").read_text()
    assert f"{folders[0]} lacks 2 modules (merged as zero updates): {layers[0]}.k_proj" in markdown
    check_peft_forward(load_base, out)


def test_allow_missing_dry_run_plans_a_module_the_first_input_lacks(make_adapter, tmp_path):
    """The plan names each output tensor as the merge writes it (the first input that has the module spells its
    keys), so a module the first input lacks is planned too and the size estimate holds."""
    folders = [
        make_adapter(r=4, alpha=8, seed=61, targets=("q_proj", "v_proj")),
        make_adapter(r=4, alpha=8, seed=62, targets=("q_proj", "k_proj")),
    ]
    args = ["merge", *folders, "--rank", "3", "--allow-missing", "-o", tmp_path / "out", "--quiet"]
    dry = run_ctm(*args, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert run_ctm(*args).exit_code == 0
    merged = report_of(tmp_path / "out")["modules"]
    assert sorted(m["name"] for m in plan["modules"]) == sorted(m["name"] for m in merged)
    written = (tmp_path / "out" / WEIGHTS).stat().st_size
    assert written <= plan["estimated_output_bytes"] <= written + 2048


def test_allow_missing_layers_to_transform(gpt2, gpt2_adapter, tmp_path):
    folders = [gpt2_adapter(71, target_modules=["c_attn"], layers_to_transform=[i]) for i in (0, 1)]
    out = tmp_path / "out"
    merge(*folders, "--rank", "4", "--allow-missing", "-o", out)
    config = config_of(out)
    assert config["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert config["layers_to_transform"] is None
    check_against_reference(folders, out, 4)
    check_peft_forward(lambda: copy.deepcopy(gpt2), out)


# ---------------------------------------------------------------- embedding LoRA


def test_embedding_lora_merges_and_loads_in_peft(tiny_llama_model, load_base, tmp_path):
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}
    folders = [save_peft_adapter(tiny_llama_model, tmp_path / f"emb-{s}", s, "tiny-llama", **options) for s in (81, 82)]
    embedding = PREFIX + "model.embed_tokens"
    for folder in folders:  # PEFT stores the embedding LoRA transposed (A: r × vocab, B: dim × r) and the base layer
        _, modules = read_adapter(folder)
        assert [m.shape for m in modules[embedding]] == [(4, 64), (32, 4)]
        assert PREFIX + "model.embed_tokens.base_layer.weight" in load_file(str(folder / WEIGHTS))
    out = tmp_path / "out"
    merge(*folders, "--rank", "6", "-o", out)
    check_against_reference(folders, out, 6)
    with safe_open(str(out / WEIGHTS), framework="pt") as handle:
        assert {embedding + ".lora_embedding_A", embedding + ".lora_embedding_B"} <= set(handle.keys())
    assert [e["action"] for e in report_of(out)["extra_tensors"]] == ["identical copy"]
    assert config_of(out)["modules_to_save"] is None
    check_peft_forward(load_base, out)


def test_differing_embedding_base_layers_are_refused(tiny_llama_model, tmp_path, out_parent):
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens"]}
    folders = [save_peft_adapter(tiny_llama_model, tmp_path / f"emb-{s}", s, "tiny-llama", **options) for s in (83, 84)]
    head_trained(folders[1], PREFIX + "model.embed_tokens.base_layer.weight", 84)
    line = fails(["merge", *folders, "-o", out_parent / "out", "--rank", "4"], 4, out_parent)
    assert "model.embed_tokens.base_layer.weight" in line and "--modules-to-save" in line


# ---------------------------------------------------------------- unsupported kinds


class TinyConvNet(torch.nn.Module):
    """A base with a Conv2d, for a convolution LoRA."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def lora_adapter(model, folder: Path, targets: list[str], **options) -> Path:
    """A rank-4 PEFT LoRA of `model` on `targets` with extra LoraConfig options."""
    return save_peft_adapter(model, folder, 1, "tiny-llama", r=4, target_modules=targets, **options)


def ia3_adapter(model, folder: Path) -> Path:
    from peft import IA3Config, get_peft_model

    config = IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    get_peft_model(copy.deepcopy(model), config).save_pretrained(folder)
    return folder


def dora_flag_only(model, folder: Path) -> Path:
    """A plain LoRA whose config claims DoRA (use_dora): refused from the config alone."""
    lora_adapter(model, folder, ["q_proj"])
    config = config_of(folder)
    config["use_dora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


# kind: (builder(model, folder), the file the error names, the reason it gives)
UNSUPPORTED = {
    "dora": (lambda m, f: lora_adapter(m, f, ["q_proj"], use_dora=True), WEIGHTS, "DoRA"),
    "dora-flag-only": (dora_flag_only, "adapter_config.json", "DoRA"),
    "lora-bias": (lambda m, f: lora_adapter(m, f, ["q_proj"], lora_bias=True), WEIGHTS, "LoRA bias"),
    "conv-lora": (lambda m, f: lora_adapter(TinyConvNet(), f, ["conv", "head"]), WEIGHTS, "4-d factors"),
    "ia3": (ia3_adapter, "adapter_config.json", "'IA3'"),
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_unsupported_kinds_refused(kind, tiny_llama_model, make_adapter, tmp_path, out_parent):
    build, named, reason = UNSUPPORTED[kind]
    folder = build(tiny_llama_model, tmp_path / kind)
    good = make_adapter(r=4, alpha=8, seed=91, targets=("q_proj",))
    line = fails(["merge", good, folder, "-o", out_parent / "out", "--rank", "4"], 4, out_parent)
    assert str(folder / named) in line and reason in line


# ---------------------------------------------------------------- dtypes


def stored_as(folder: Path, target: Path, dtype: torch.dtype) -> Path:
    """A copy of an adapter with every tensor stored in `dtype`."""
    writable_copy(folder, target)
    save_file({k: v.to(dtype).contiguous() for k, v in load_file(str(folder / WEIGHTS)).items()}, str(target / WEIGHTS))
    return target


@pytest.mark.parametrize(
    ("requested", "stored", "tolerance"),
    [(None, "F32", TOLERANCE), ("float16", "F16", 2e-3), ("bfloat16", "BF16", 2e-2)],
)
def test_mixed_dtypes(make_adapter, tmp_path, requested, stored, tolerance):
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    folders = [
        stored_as(make_adapter(r=4, alpha=8, seed=95 + i, targets=("q_proj", "v_proj")), tmp_path / f"in-{i}", dtype)
        for i, dtype in enumerate(dtypes)
    ]
    out = tmp_path / "out"
    merge(*folders, "--rank", "6", *(["--dtype", requested] if requested else []), "-o", out)
    assert stored_dtypes(out) == {stored}
    written, expected = written_deltas(out), inputs_of(folders)  # the stored half-precision values, exactly
    for name, (As, Bs, scales) in expected.items():
        assert relative(written[name], ctm_ta(As, Bs, scales, 6).delta) < tolerance, name


def test_all_float16_inputs_give_float16(make_adapter, tmp_path):
    folders = [
        stored_as(make_adapter(r=4, alpha=8, seed=s, targets=("q_proj",)), tmp_path / f"h{s}", torch.float16)
        for s in (97, 98)
    ]
    merge(*folders, "--rank", "4", "-o", tmp_path / "out")
    assert stored_dtypes(tmp_path / "out") == {"F16"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_allow_missing_works_with_every_method(make_adapter, load_base, tmp_path, method):
    """A missing module is a rank-0 input: every method must take it (robustmerge's pruning once crashed on it)."""
    folders = [
        make_adapter(r=4, alpha=8, seed=61, targets=("q_proj", "v_proj")),
        make_adapter(r=4, alpha=8, seed=62, targets=("q_proj", "k_proj")),
    ]
    out = tmp_path / "out"
    merge(*folders, "--rank", "2", "--allow-missing", "--method", method, "-o", out)
    check_peft_forward(load_base, out)
