"""Odd but valid inputs that must work: non-UTF-8 and control-character names (shown escaped everywhere), base
models named differently but identical (the Hub's renames, local paths, cache folders), base models named by
none or overridden with --base-model, and the regular expressions PEFT users write in rank patterns."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from helpers import TARGETS, edit_config, edit_tensors, run_ctm

from ctm_cli.base_model import HUB_RENAMES, Identity, identity
from ctm_cli.patterns import pattern_problem
from ctm_cli.untrusted import printable

WRITTEN_TEXT = ("merge_report.md", "README.md", "recipe.yaml", "merge_report.json", "adapter_config.json")


@pytest.fixture
def pair_in(sandbox, make_adapter) -> tuple[Path, Path]:
    return (
        sandbox.copy(make_adapter(r=4, alpha=8, seed=41, targets=TARGETS), "first"),
        sandbox.copy(make_adapter(r=4, alpha=8, seed=42, targets=TARGETS), "second"),
    )


def merge(*args) -> object:
    result = run_ctm("merge", *args)
    assert result.exit_code == 0, result.stderr
    return result


def warnings_of(stderr: str) -> list[str]:
    return [line.removeprefix("ctm: warning: ") for line in stderr.splitlines() if line.startswith("ctm: warning:")]


# ---------------------------------------------------------------- names


def test_printable_escapes_control_characters_only():
    assert printable("q_proj é 中 [bold] :smile:") == "q_proj é 中 [bold] :smile:"
    assert printable("a\x1b[31mb\nc\td\re\x7f\x85\u202e\u2028") == "a\\x1b[31mb\\nc\\td\\re\\x7f\\x85\\u202e\\u2028"
    assert printable(os.fsdecode(b"caf\xe9")) == "caf\\xe9"  # a non-UTF-8 byte of a file name, as the byte


def test_non_utf8_names(sandbox, pair_in):
    """Folders whose names are not UTF-8 (bytes Python holds as surrogates) merge; texts show the bytes escaped;
    recipe.yaml names the folders exactly, so it repeats the merge byte for byte."""
    source = Path(os.fsdecode(bytes(pair_in[0]) + b"-\xff"))
    pair_in[0].rename(source)
    out = Path(os.fsdecode(bytes(sandbox.outputs / "out") + b"-\xfe"))
    result = merge(source, pair_in[1], "-o", out, "--rank", "4")
    assert "out-\\xfe" in result.stderr
    texts = {name: (out / name).read_text(encoding="utf-8") for name in WRITTEN_TEXT}
    assert "-\\xff" in texts["merge_report.md"] and "-\\xff" in texts["README.md"]
    assert "# out-\\xfe" in texts["README.md"]
    again = sandbox.outputs / "again"
    merge("--config", out / "recipe.yaml", "-o", again)
    assert (again / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


def test_control_characters_in_names_are_escaped_everywhere(sandbox, pair_in):
    """A source folder and a tensor key holding terminal escape sequences: merged, and no output (stderr, reports,
    model card, inspect table) carries a raw control character."""
    source = pair_in[0].rename(pair_in[0].parent / "evil\x1b[2J\x1b]0;title\x07")
    head = "base_model.model.lm_head\x1b[31m.weight"
    for folder in (source, pair_in[1]):
        edit_tensors(folder, lambda t: t.update({head: t[next(iter(t))][:1].clone()}))
    out = sandbox.outputs / "out"
    result = merge(source, pair_in[1], "-o", out, "--rank", "4", "--modules-to-save", "first")
    shown = [result.stderr, *((out / name).read_text(encoding="utf-8") for name in WRITTEN_TEXT)]
    inspected = run_ctm("inspect", source, env={"COLUMNS": "300"})
    assert inspected.exit_code == 0, inspected.stderr
    shown.append(inspected.stdout)
    for text in shown:
        assert "\x1b" not in text and "\x07" not in text
    assert "evil\\x1b[2J" in (out / "merge_report.md").read_text()
    assert "lm_head\\x1b[31m.weight" in (out / "merge_report.md").read_text()
    assert "evil\\x1b[2J" in inspected.stdout


def test_rich_markup_and_emoji_codes_are_shown_as_written(pair_in):
    base = "org/[bold]base:smile:"
    edit_config(pair_in[0], base_model_name_or_path=base)
    inspected = run_ctm("inspect", pair_in[0], env={"COLUMNS": "200"})
    assert base in inspected.stdout and "😄" not in inspected.stdout


# ---------------------------------------------------------------- base models


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("gpt2", "openai-community/gpt2"),
        ("bert-base-uncased", "google-bert/bert-base-uncased"),
        ("/models/Llama-2-7b-hf/", "meta-llama/Llama-2-7b-hf"),
        ("~/.cache/huggingface/hub/models--meta-llama--Llama-2-7b-hf/snapshots/0123abc", "meta-llama/Llama-2-7b-hf"),
        ("Meta-Llama/LLAMA-2-7b-hf", "meta-llama/Llama-2-7b-hf"),
        ("C:\\models\\gpt2", "gpt2"),
        ("./gpt2", "openai-community/gpt2"),
    ],
)
def test_same_base_model_under_other_names(first, second):
    assert identity(first).same_as(identity(second))
    assert identity(second).same_as(identity(first))


@pytest.mark.parametrize(
    ("first", "second"),
    [("gpt2", "someone/gpt2"), ("gpt2", "gpt2-medium"), ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf")],
)
def test_different_base_models(first, second):
    assert not identity(first).same_as(identity(second))


def test_renames_table_maps_to_organisation_ids():
    assert HUB_RENAMES["gpt2"] == "openai-community/gpt2"
    assert all(new.endswith("/" + old) for old, new in HUB_RENAMES.items())
    assert identity("distilbert-base-uncased") == Identity("distilbert", "distilbert-base-uncased")


def test_renamed_base_model_ids_merge(sandbox, pair_in):
    edit_config(pair_in[0], base_model_name_or_path="gpt2")
    edit_config(pair_in[1], base_model_name_or_path="openai-community/gpt2")
    out = sandbox.outputs / "out"
    result = merge(*pair_in, "-o", out, "--rank", "4")
    assert warnings_of(result.stderr) == []
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "gpt2"


def test_null_base_model_is_accepted_with_a_warning(sandbox, pair_in):
    edit_config(pair_in[1], base_model_name_or_path=None)
    out = sandbox.outputs / "out"
    result = merge(*pair_in, "-o", out, "--rank", "4")
    [warning] = warnings_of(result.stderr)
    assert str(pair_in[1]) in warning and "names no base model" in warning and "tiny-llama" in warning
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    assert json.loads((out / "merge_report.json").read_text())["warnings"] == [warning]
    quiet = merge(*pair_in, "-o", sandbox.outputs / "quiet", "--rank", "4", "--quiet")
    assert quiet.stderr == ""


def test_no_base_model_at_all(sandbox, pair_in):
    for folder in pair_in:
        edit_config(folder, base_model_name_or_path=None)
    out = sandbox.outputs / "out"
    result = merge(*pair_in, "-o", out, "--rank", "4", "--dry-run", "--json")
    assert json.loads(result.stdout)["warnings"] == warnings_of(result.stderr)
    [warning] = warnings_of(result.stderr)
    assert "no input names its base model" in warning and "--base-model" in warning


def test_base_model_override_is_recorded(sandbox, pair_in):
    """--base-model merges adapters that name different base models, and says so in every output."""
    edit_config(pair_in[1], base_model_name_or_path="other-llama")
    out = sandbox.outputs / "out"
    result = merge(*pair_in, "-o", out, "--rank", "4", "--base-model", "org/tiny-llama")
    assert warnings_of(result.stderr) == []
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-llama"
    report = json.loads((out / "merge_report.json").read_text())
    assert report["settings"]["base_model"] == "org/tiny-llama" and report["settings"]["base_model_overridden"]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["base_model"] == "org/tiny-llama"
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "org/tiny-llama"
    assert "| base model | org/tiny-llama (set with --base-model) |" in card
    assert "from_pretrained('org/tiny-llama')" in card
    again = sandbox.outputs / "again"
    merge("--config", out / "recipe.yaml", "-o", again)  # the recipe repeats the merge, override included
    assert (again / "adapter_config.json").read_text() == (out / "adapter_config.json").read_text()


def test_base_model_recipe_key(sandbox, pair_in):
    edit_config(pair_in[1], base_model_name_or_path="other-llama")
    recipe = sandbox.inputs / "recipe.yaml"
    recipe.write_text(f"adapters:\n  - source: {pair_in[0]}\n  - source: {pair_in[1]}\nrank: 4\nbase_model: mine\n")
    merge("--config", recipe, "-o", sandbox.outputs / "out")
    config = json.loads((sandbox.outputs / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "mine"


# ---------------------------------------------------------------- rank patterns


@pytest.mark.parametrize(
    "key",
    [
        "q_proj",
        "model.layers.0.self_attn.q_proj",  # unescaped dots, as in PEFT's documentation
        r"^model\.layers\.\d+\.mlp\.down_proj",
        ".*self_attn.*",
        r"layers\.[0-9]{1,2}\.self_attn\.(q|v)_proj",
        "(?:k|v)_proj",
        re.escape("m." * 149 + "q"),  # ctm's own output: the longest module name, escaped
    ],
)
def test_usual_pattern_keys_are_accepted(key):
    assert pattern_problem(key) is None


def test_regex_rank_pattern_merges(sandbox, make_adapter):
    """A PEFT adapter with a regex rank_pattern: the module ranks ctm reads are PEFT's."""
    pattern = {r"layers\.\d+\.self_attn\.q_proj": 2}
    first = sandbox.copy(make_adapter(r=4, alpha=8, seed=43, targets=TARGETS, rank_pattern=pattern), "first")
    second = sandbox.copy(make_adapter(r=4, alpha=8, seed=44, targets=TARGETS, rank_pattern=pattern), "second")
    out = sandbox.outputs / "out"
    merge(first, second, "-o", out, "--rank", "4", "--json")
    modules = json.loads((out / "merge_report.json").read_text())["modules"]
    ranks = {module["name"].split(".")[-1]: module["ranks"] for module in modules}
    assert ranks["q_proj"] == [2, 2] and ranks["v_proj"] == [4, 4]
