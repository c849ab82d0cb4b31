"""The catalog of bad inputs, part two: options the parser or ctm refuses, recipes, adapter configs and weights
files a hostile or careless hand could write, Hub references that escape the repository, and base models that
differ. Each case runs in a sandbox (tests/sandbox.py) and must give exactly one `ctm: error:` line naming
the culprit, its documented exit code, and change nothing."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import A_KEY, B_KEY, CONFIG, TARGETS, WEIGHTS, edit_config, edit_tensors, write
from safetensors.torch import load_file
from sandbox import Sandbox, run_as_user, snapshot_tree

import ctm_cli.adapter

GOOD_RECIPE = "adapters:\n  - source: {good}\n  - source: {other}\nrank: 4\n"


@pytest.fixture
def pair_in(sandbox, make_adapter) -> tuple[Path, Path]:
    """Two valid adapters (r=4) copied into the sandbox; the second is the one the cases break."""
    return (
        sandbox.copy(make_adapter(r=4, alpha=8, seed=31, targets=TARGETS), "good"),
        sandbox.copy(make_adapter(r=4, alpha=8, seed=32, targets=TARGETS), "other"),
    )


def merge_args(sandbox: Sandbox, pair: tuple[Path, Path], *options: str) -> list:
    return ["merge", *pair, "-o", sandbox.out, "--rank", "4", *options]


# ---------------------------------------------------------------- options: the parser's errors and ctm's checks

# name: (command line after `ctm`, with {out} for the output and {a} {b} for the adapters; exit code; culprits)
OPTIONS: dict[str, tuple[str, int, list[str]]] = {
    "misspelled-option": ("merge {a} {b} -o {out} --rnak 8", 2, ["--rnak", "(see ctm merge --help)"]),
    "rank-not-integer": ("merge {a} {b} -o {out} --rank eight", 2, ["'--rank'", "(see ctm merge --help)"]),
    "option-without-value": ("merge {a} {b} -o {out} --rank", 2, ["'--rank' requires an argument (see ctm merge"]),
    "unknown-command": ("mrege {a} {b}", 2, ["'mrege'", "(see ctm --help)"]),
    "unknown-root-option": ("--verbose", 2, ["--verbose", "(see ctm --help)"]),
    "inspect-missing-path": ("inspect", 2, ["'path'", "(see ctm inspect --help)"]),
    "inspect-spectra-not-integer": ("inspect {a} --spectra many", 2, ["'--spectra'", "(see ctm inspect --help)"]),
    "methods-unknown-option": ("methods --yaml", 2, ["--yaml", "(see ctm methods --help)"]),
    "device-unknown": ("merge {a} {b} -o {out} --device foo", 2, ["--device 'foo'", "auto, cpu, cuda, cuda:N"]),
    "device-meta": ("merge {a} {b} -o {out} --device meta", 2, ["--device 'meta'"]),
    "device-uppercase": ("merge {a} {b} -o {out} --device CPU", 2, ["--device 'CPU'"]),
    "seed-too-large": ("merge {a} {b} -o {out} --seed 1208925819614629174706176", 2, ["--seed", "2**64-1"]),
    "seed-too-negative": ("merge {a} {b} -o {out} --seed -9223372036854775809", 2, ["--seed", "-2**63"]),
    "max-memory-zero": ("merge {a} {b} -o {out} --max-memory 0", 2, ["--max-memory", "positive", "got 0"]),
    "max-memory-negative": ("merge {a} {b} -o {out} --max-memory -5", 2, ["--max-memory", "got -5"]),
    "dtype-integer": ("merge {a} {b} -o {out} --dtype int8", 2, ["--dtype 'int8'", "float32"]),
    "method-unknown": ("merge {a} {b} -o {out} --method nope", 2, ["nope"]),
    "rule-unknown": ("merge {a} {b} -o {out} --rule nope", 2, ["nope"]),
    "param-not-number": ("merge {a} {b} -o {out} --param lambda=high", 2, ["--param", "'lambda=high'"]),
    "param-without-value": ("merge {a} {b} -o {out} --param lambda", 2, ["--param", "NAME=NUMBER"]),
    "weights-not-numbers": ("merge {a} {b} -o {out} --weights 1,heavy", 2, ["--weights", "'1,heavy'"]),
    "beta-above-one": ("merge {a} {b} -o {out} --beta 2", 2, ["--beta", "got 2.0"]),
    "private-without-push": ("merge {a} {b} -o {out} --private", 2, ["--private", "--push-to-hub"]),
    "push-target-not-a-repo": ("merge {a} {b} -o {out} --push-to-hub not/a/repo", 2, ["--push-to-hub", "org/name"]),
    "no-adapters": ("merge -o {out}", 2, ["no adapters"]),
    "no-output": ("merge {a} {b}", 2, ["no output folder", "-o/--output"]),
    "base-model-empty": ("merge {a} {b} -o {out} --base-model ''", 2, ["--base-model"]),
    "source-name-too-long": ("merge {a} " + "x" * 300 + " -o {out}", 3, ["xxxx", "File name too long"]),
    "source-named-like-markup": ("merge {a} ':warning:[red]b' -o {out}", 3, [":warning:[red]b: no such adapter"]),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_bad_option(name, sandbox, pair_in):
    command, code, culprits = OPTIONS[name]
    text = command.format(a=pair_in[0], b=pair_in[1], out=sandbox.out)
    sandbox.refuses(shlex.split(text), code, *culprits)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(sandbox, pair_in):
    line = sandbox.refuses(merge_args(sandbox, pair_in, "--device", "cuda"), 2, "--device cuda", "no CUDA device")
    assert "--device cpu" in line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_cuda_index_out_of_range(sandbox, pair_in):
    sandbox.refuses(merge_args(sandbox, pair_in, "--device", "cuda:999"), 2, "--device cuda:999", "CUDA device(s)")


# ---------------------------------------------------------------- recipes


def recipe_with(sandbox: Sandbox, pair: tuple[Path, Path], extra: str) -> Path:
    path = sandbox.inputs / "recipe.yaml"
    path.write_text(GOOD_RECIPE.format(good=pair[0], other=pair[1]) + extra)
    return path


# name: (text after a valid recipe, exit code, culprits besides the recipe's path)
RECIPES: dict[str, tuple[str, int, list[str]]] = {
    "python-name-tag": ("seed: !!python/name:os.system\n", 2, [":5:", "YAML tag !!python/name:os.system"]),
    "python-object-tag": ("params: !!python/object/apply:os.system [ls]\n", 2, [":5:", "!!python/object/apply"]),
    "int-tag-not-int": ("seed: !!int abc\n", 2, [":5:", "seed", "'abc'"]),
    "float-tag-not-float": ("beta: !!float nope\n", 2, [":5:", "beta", "'nope'"]),
    "impossible-timestamp": ("seed: !!timestamp 2001-13-45\n", 2, [":5:", "seed", "'2001-13-45'"]),
    "binary-tag": ("device: !!binary aGVsbG8=\n", 2, [":5:", "YAML tag !!binary"]),
    "local-tag": ("method: !ctm x\n", 2, [":5:", "YAML tag !ctm"]),
    "seed-too-large": ("seed: 1208925819614629174706176\n", 2, [":5:", "seed", "2**64-1"]),
    "base-model-not-text": ("base_model: [gpt2]\n", 2, [":5:", "base_model", "expected text"]),
    "alias-of-a-list": ("device: &d [cpu]\noutput: *d\n", 2, [":5:", "device", "expected text"]),
    "nul-in-output": ('output: "out\\0"\n', 2, [":5:", "output", "NUL character"]),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_bad_recipe(name, sandbox, pair_in):
    extra, code, culprits = RECIPES[name]
    recipe = recipe_with(sandbox, pair_in, extra)
    sandbox.refuses(["merge", "--config", recipe, "-o", sandbox.out], code, str(recipe), *culprits)


def test_recipe_nested_5000_deep(sandbox, pair_in):
    recipe = recipe_with(sandbox, pair_in, "params: " + "[" * 5000 + "]" * 5000 + "\n")
    sandbox.refuses(["merge", "--config", recipe, "-o", sandbox.out], 2, str(recipe), "nested too deeply")


def test_recipe_endless_file(sandbox):
    sandbox.refuses(["merge", "--config", "/dev/zero", "-o", sandbox.out], 2, "/dev/zero", "larger than 16 MiB")


def test_recipe_not_utf8(sandbox, pair_in):
    recipe = recipe_with(sandbox, pair_in, "# caf\xe9\n")
    recipe.write_bytes(recipe.read_bytes().replace("é".encode(), b"\xe9"))
    sandbox.refuses(["merge", "--config", recipe, "-o", sandbox.out], 2, str(recipe), "cannot read the recipe", "utf-8")


def test_recipe_is_a_folder(sandbox):
    sandbox.refuses(["merge", "--config", sandbox.inputs, "-o", sandbox.out], 2, str(sandbox.inputs), "Is a directory")


# ---------------------------------------------------------------- adapter configs


def nested_config(folder: Path) -> Path:
    return write(folder / CONFIG, "[" * 100_000 + "]" * 100_000)


def huge_integer(folder: Path) -> Path:
    text = (folder / CONFIG).read_text().replace('"r": 4', '"r": ' + "4" * 5000)
    return write(folder / CONFIG, text)


def rank_zero_module(folder: Path) -> Path:
    """q_proj of rank 0 in the weights, and rank_pattern saying so (the ZeroDivisionError of the issue)."""
    edit_config(folder, rank_pattern={"q_proj": 0})

    def cut(tensors: dict[str, torch.Tensor]) -> None:
        for key in [key for key in tensors if ".q_proj." in key]:
            tensors[key] = tensors[key][:0] if "lora_A" in key else tensors[key][:, :0]

    edit_tensors(folder, cut)
    return folder / CONFIG


# name: (break the adapter folder -> the file the error names, exit code, words in the message)
CONFIGS: dict[str, tuple[Callable[[Path], Path], int, list[str]]] = {
    "nested-100000-deep": (nested_config, 3, ["nested too deeply"]),
    "not-utf8": (lambda f: write(f / CONFIG, b'{"r": 4, "note": "caf\xe9"}'), 3, ["not valid JSON", "UTF-8"]),
    "integer-of-5000-digits": (huge_integer, 3, ["a number of thousands of digits"]),
    "r-beyond-float": (lambda f: edit_config(f, r=10**400), 3, ["'r'", "not a finite number"]),
    "alpha-beyond-float": (lambda f: edit_config(f, lora_alpha=-(10**400)), 3, ["'lora_alpha'"]),
    "rank-pattern-nested-repetition": (
        lambda f: edit_config(f, rank_pattern={"(a+)+b": 2}),
        3,
        ["rank_pattern key '(a+)+b' refused", "repetition inside a repetition"],
    ),
    "rank-pattern-repeated-alternation": (
        lambda f: edit_config(f, rank_pattern={"(q|qq)*_proj": 2}),
        3,
        ["rank_pattern key '(q|qq)*_proj'", "alternation"],
    ),
    "alpha-pattern-back-reference": (
        lambda f: edit_config(f, alpha_pattern={r"(q)\1_proj": 2}),
        3,
        ["alpha_pattern key", "back-reference"],
    ),
    "rank-pattern-three-wildcards": (
        lambda f: edit_config(f, rank_pattern={".*a.*b.*c": 2}),
        3,
        ["rank_pattern key '.*a.*b.*c'", "3 unbounded repetitions"],
    ),
    "rank-pattern-key-too-long": (
        lambda f: edit_config(f, rank_pattern={"q" * 601: 2}),
        3,
        ["rank_pattern key 'qqq", "longer than 600 characters"],
    ),
    "rank-pattern-not-a-regex": (
        lambda f: edit_config(f, rank_pattern={"(q_proj": 2}),
        3,
        ["rank_pattern key '(q_proj'", "not a valid regular expression"],
    ),
    "rank-pattern-zero": (rank_zero_module, 3, ["rank_pattern key 'q_proj' gives rank 0", "positive integers"]),
    "rank-pattern-fraction": (lambda f: edit_config(f, rank_pattern={"q_proj": 2.5}), 3, ["gives rank 2.5"]),
    "alpha-pattern-not-number": (lambda f: edit_config(f, alpha_pattern={"q_proj": "x"}), 3, ["alpha_pattern", "'x'"]),
    "rank-pattern-a-list": (lambda f: edit_config(f, rank_pattern=["q_proj"]), 3, ["'rank_pattern'"]),
    "base-model-a-number": (lambda f: edit_config(f, base_model_name_or_path=7), 3, ["'base_model_name_or_path'"]),
    "task-type-a-list": (lambda f: edit_config(f, task_type=["CAUSAL_LM"]), 3, ["'task_type'"]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bad_config(name, sandbox, pair_in):
    damage, code, words = CONFIGS[name]
    named = damage(pair_in[1])
    sandbox.refuses(merge_args(sandbox, pair_in), code, str(named), *words)


def test_oversized_config(sandbox, pair_in, monkeypatch):
    """A config beyond the read limit (64 MiB; lowered here to keep the test small) is not read whole."""
    monkeypatch.setattr(ctm_cli.adapter, "CONFIG_LIMIT", 4096)
    path = edit_config(pair_in[1], padding="x" * 5000)
    sandbox.refuses(merge_args(sandbox, pair_in), 3, str(path), "larger than 4096 bytes", "not an adapter config")


# ---------------------------------------------------------------- weights files


def duplicate_factor(tensors: dict[str, torch.Tensor]) -> None:
    """`...lora_A` besides `...lora_A.weight`, a different tensor of the same shape."""
    tensors[A_KEY.removesuffix(".weight")] = torch.zeros_like(tensors[A_KEY])


def long_key(tensors: dict[str, torch.Tensor]) -> None:
    tensors["base_model.model." + "deep." * 70 + "q.lora_A.weight"] = torch.zeros(4, 4)


def escape_sequence_key(tensors: dict[str, torch.Tensor]) -> None:
    tensors["base_model.model.head\x1b[2J\x1b[31m.lora_C.weight"] = torch.zeros(2, 2)


def bin_of(content) -> Callable[[Path], Path]:
    def change(folder: Path) -> Path:
        (folder / WEIGHTS).unlink()
        torch.save(content, folder / "adapter_model.bin")
        return folder / "adapter_model.bin"

    return change


def truncated_bin(folder: Path) -> Path:
    path = bin_of(load_file(str(folder / WEIGHTS)))(folder)
    return write(path, path.read_bytes()[:200])


# name: (break the adapter folder -> the file the error names, exit code, words in the message)
WEIGHT_FILES: dict[str, tuple[Callable[[Path], Path], int, list[str]]] = {
    "lora-a-with-and-without-weight-suffix": (
        lambda f: edit_tensors(f, duplicate_factor),
        3,
        [A_KEY, A_KEY.removesuffix(".weight") + " and", "keep one of them"],
    ),
    "key-too-long": (lambda f: edit_tensors(f, long_key), 3, ["382 characters, more than 300"]),
    "key-with-escape-sequences": (
        lambda f: edit_tensors(f, escape_sequence_key),
        3,
        ["unrecognised LoRA tensor", "head\\x1b[2J\\x1b[31m.lora_C"],
    ),
    "b-factor-1d": (
        lambda f: edit_tensors(f, lambda t: t.update({B_KEY: t[B_KEY][:, 0].contiguous()})),
        3,
        ["down_proj: lora_B has shape [32], not a matrix"],
    ),
    "bin-truncated": (truncated_bin, 3, ["not a loadable torch file"]),
    "bin-of-a-string-key-to-list": (bin_of({A_KEY: [1, 2]}), 3, ["dict of named tensors"]),
    "weights-is-a-folder": (lambda f: (f / WEIGHTS).unlink() or (f / WEIGHTS).mkdir() or f, 3, ["no adapter_model"]),
}


@pytest.mark.parametrize("name", list(WEIGHT_FILES))
def test_bad_weights(name, sandbox, pair_in):
    damage, code, words = WEIGHT_FILES[name]
    named = damage(pair_in[1])
    line = sandbox.refuses(merge_args(sandbox, pair_in), code, str(named), *words)
    assert "\x1b" not in line


# ---------------------------------------------------------------- inspect


def nan_factor(folder: Path) -> Path:
    return edit_tensors(folder, lambda t: t[A_KEY].__setitem__((0, 0), float("nan")))


def rank_zero_factors(folder: Path) -> Path:
    edit_tensors(folder, lambda t: t.update({A_KEY: t[A_KEY][:0], B_KEY: t[B_KEY][:, :0]}))
    return folder / WEIGHTS


# name: (break the adapter folder -> the file the error names, exit code, words in the message)
INSPECTED: dict[str, tuple[Callable[[Path], Path], int, list[str]]] = {
    "nan-factor": (nan_factor, 3, ["down_proj", "NaN or infinite"]),
    "rank-zero-factors": (rank_zero_factors, 3, ["down_proj", "rank 0", "r=4"]),
    "rank-zero-by-pattern": (rank_zero_module, 3, ["gives rank 0"]),
    "nested-config": (nested_config, 3, ["nested too deeply"]),
    "a-file-not-a-folder": (lambda f: f / CONFIG, 3, ["not a folder"]),
}


@pytest.mark.parametrize("name", list(INSPECTED))
def test_bad_inspect(name, sandbox, pair_in):
    damage, code, words = INSPECTED[name]
    named = damage(pair_in[1])
    target = named if name == "a-file-not-a-folder" else pair_in[1]
    sandbox.refuses(["inspect", target], code, str(named), *words)


# ---------------------------------------------------------------- Hub references that escape the repository

ESCAPES = {
    "dot-dot-subfolder": ("hf://org/a@main/../../x", "subfolder '../../x'"),
    "absolute-subfolder": ("org/a@main//etc", "subfolder '/etc'"),
    "backslash-subfolder": ("hf://org/a/sub\\..\\..\\x", "subfolder 'sub\\\\..\\\\..\\\\x'"),
    "dot-subfolder": ("hf://org/a/./adapter", "subfolder './adapter'"),
    "dot-dot-revision": ("hf://org/a@..", "revision '..'"),
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_hub_reference_escaping_the_repository(name, sandbox, pair_in):
    source, what = ESCAPES[name]
    sandbox.refuses(["merge", pair_in[0], source, "-o", sandbox.out], 3, source, what, "outside the Hub repository")
    sandbox.refuses(["inspect", source], 3, what)


def test_recipe_revision_escaping_the_repository(sandbox, pair_in):
    recipe = sandbox.inputs / "hub.yaml"
    recipe.write_text(f"adapters:\n  - source: {pair_in[0]}\n  - source: org/a\n    revision: ../../../x\n")
    sandbox.refuses(["merge", "--config", recipe, "-o", sandbox.out], 3, "org/a", "revision '../../../x'")


# ---------------------------------------------------------------- base models


def test_different_base_model_names(sandbox, pair_in):
    edit_config(pair_in[1], base_model_name_or_path="other-llama")
    line = sandbox.refuses(merge_args(sandbox, pair_in), 4, "tiny-llama", "other-llama", "different model names")
    assert "--base-model NAME" in line and "equal shapes" in line


def test_same_name_in_different_organisations(sandbox, pair_in):
    edit_config(pair_in[0], base_model_name_or_path="gpt2")  # the Hub renamed it openai-community/gpt2
    edit_config(pair_in[1], base_model_name_or_path="someone/gpt2")
    line = sandbox.refuses(merge_args(sandbox, pair_in), 4, "gpt2 (= openai-community/gpt2)", "someone/gpt2")
    assert "same name in different organisations" in line


def test_different_base_models_and_shapes(sandbox, pair_in, make_adapter):
    wider = sandbox.copy(make_adapter(r=4, alpha=8, seed=33, targets=TARGETS, model_overrides={"hidden_size": 48}), "w")
    edit_config(wider, base_model_name_or_path="wide-llama")
    line = sandbox.refuses(["merge", pair_in[0], wider, "-o", sandbox.out, "--rank", "4"], 4, "wide-llama")
    assert "module shapes differ too" in line and "--base-model" not in line


# ---------------------------------------------------------------- permissions (a real refusal by the kernel)

UNREADABLE = {
    "config-file": (lambda f: f / CONFIG, 0o000),
    "weights-file": (lambda f: f / WEIGHTS, 0o000),
    "folder-not-searchable": (lambda f: f, 0o600),
}


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_unreadable_input(name, sandbox, pair_in):
    """Files and folders ctm may not read, refused by the kernel (see sandbox.run_as_user)."""
    culprit, mode = UNREADABLE[name]
    path = culprit(pair_in[1])
    before, original = snapshot_tree(sandbox.root), path.stat().st_mode & 0o7777
    path.chmod(mode)
    try:
        result = run_as_user(["merge", *pair_in, "-o", sandbox.out, "--rank", "4"])
    finally:
        path.chmod(original)
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ctm: error: "), result.stderr
    assert "cannot be read" in result.stderr and "Permission denied" in result.stderr
    assert str(path) in result.stderr or str(pair_in[1]) in result.stderr
    assert snapshot_tree(sandbox.root) == before
