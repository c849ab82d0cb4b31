"""Helpers the tests share (their fixtures live in conftest.py): the tiny Llama and real PEFT adapters on it, running
`ctm` in-process, reading written adapters back, editing adapters to break them, a local Hugging Face cache, and
the core-space forms the tests compare the product's factored math with."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import config_scale
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ctm_cli import core_space as cs
from ctm_cli.fixed_order import matmul

SHARED = (Path(__file__).parents[1] / ".." / "shared").resolve()
REAL_ADAPTERS = SHARED / "real-adapters"
needs_shared = pytest.mark.skipif(not REAL_ADAPTERS.is_dir(), reason="../shared not present beside the clone")

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# Suffixes of the (A, B) factor keys: linear LoRA, then embedding LoRA.
FACTOR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
BASE_NAME = "tiny-llama"
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The adapters that break: targets, and the factors of one module.
TARGETS = ("q_proj", "v_proj", "down_proj")
A_KEY = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


# ----------------------------------------------------------------- the tiny Llama and its adapters


def tiny_llama_config(**overrides):
    """The tiny Llama every test uses (hidden 32, MLP 64, 2 layers, 4 heads, 2 kv heads, vocab 64)."""
    from transformers import LlamaConfig

    settings = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 64,
        "max_position_embeddings": 64,
    }
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_tiny_llama(**overrides):
    """A freshly initialised tiny Llama (seeded), in float32 and eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(torch.float32)
    return model.eval()


def save_peft_adapter(model, folder: Path, seed: int, base_model: str, **lora_options) -> Path:
    """Save a real PEFT LoRA adapter (random, non-zero factors) of a copy of `model` to `folder`.

    `lora_options` go to peft.LoraConfig; the config's base_model_name_or_path is set to `base_model`.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(init_lora_weights=False, **lora_options)
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # transformers' deprecation notice raised inside PEFT, not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(folder)
    config_path = folder / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(saved, indent=2))
    return folder


# ------------------------------------------------------------------------------------- running ctm


def run_ctm(*args: str | Path, env: dict[str, str] | None = None):
    """Run `ctm ARGS...` in-process with typer's CliRunner; the result has separate .stdout and .stderr."""
    from ctm_cli.cli import app

    runner = CliRunner()
    return runner.invoke(app, [str(arg) for arg in args], env=env, catch_exceptions=False)


def listing(folder: Path) -> list[str]:
    """Every entry of a folder, hidden ones included, sorted."""
    return sorted(path.name for path in folder.iterdir())


def single_error_line(stderr: str) -> str:
    """The one non-blank line of stderr (fails if there are more)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def fails(args: list, code: int, parent: Path) -> str:
    """Run `ctm ARGS`, expect exit `code`, an error line, and no change in `parent`; return stderr."""
    before = listing(parent)
    result = run_ctm(*args)
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert listing(parent) == before
    line = single_error_line(result.stderr)
    assert line.startswith("ctm: error:")
    return line


SIGINT_SCRIPT = """
import os, signal, sys
import ctm_cli.engine as engine
from ctm_cli.cli import main

load_group, calls = engine._load_group, []

def load_then_interrupt(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # a real SIGINT to this process, delivered while the merge is under way
        os.kill(os.getpid(), signal.SIGINT)
    return load_group(*args, **kwargs)

engine._load_group = load_then_interrupt
sys.argv = ["ctm", *sys.argv[1:]]
main()
"""


# -------------------------------------------------------------------------------- written adapters


def read_adapter(folder: Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Config and {module: (A, B)} in float64 of an adapter folder (linear and embedding LoRA)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / WEIGHTS))
    modules = {}
    for key in tensors:
        for a_suffix, b_suffix in FACTOR_SUFFIXES:
            if key.endswith(a_suffix):
                name = key.removesuffix(a_suffix)
                a = tensors[key].to(torch.float64).numpy()
                b = tensors[name + b_suffix].to(torch.float64).numpy()
                modules[name] = (a, b)
    return config, modules


def written_deltas(folder: Path) -> dict[str, np.ndarray]:
    """ΔW = scale · B · A (out × in) of every module of a written adapter, the scale taken from its own config."""
    config, modules = read_adapter(folder)
    return {name: config_scale(config, name.removeprefix(PREFIX)) * (b @ a) for name, (a, b) in modules.items()}


def inputs_of(folders: list[Path]) -> dict[str, tuple[list, list, list[float]]]:
    """{module: (As, Bs, scales)} over the input adapters; an adapter lacking a module gives rank-0 factors."""
    read = [read_adapter(folder) for folder in folders]
    names = sorted(set().union(*(modules for _, modules in read)))
    result = {}
    for name in names:
        a, b = next(modules[name] for _, modules in read if name in modules)
        empty = (np.zeros((0, a.shape[1])), np.zeros((b.shape[0], 0)))
        factors = [modules.get(name, empty) for _, modules in read]
        scales = [config_scale(config, name.removeprefix(PREFIX)) for config, _ in read]
        result[name] = ([a for a, _ in factors], [b for _, b in factors], scales)
    return result


def relative(x: np.ndarray, y: np.ndarray) -> float:
    """‖x − y‖ / ‖y‖."""
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def stored_dtypes(folder: Path) -> set[str]:
    """The safetensors dtype names (F32, BF16, ...) of an adapter's stored tensors."""
    with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
        return {handle.get_slice(key).get_dtype() for key in handle.keys()}  # noqa: SIM118 (not a dict)


# ------------------------------------------------------------------------------- breaking adapters


def edit_config(folder: Path, **changes) -> Path:
    """Change (or, with value None, remove) fields of an adapter's config; returns the config path."""
    path = folder / CONFIG
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return path


def edit_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Rewrite an adapter's safetensors file after `change` edits its tensors in place; returns its path."""
    path = folder / WEIGHTS
    tensors = load_file(str(path))
    change(tensors)
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


def write(path: Path, data: bytes | str) -> Path:
    """Replace a file's content; returns its path."""
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------- a Hugging Face cache


HUB_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what a cached adapter repo holds


def cache_repo(cache: Path, repo: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> str:
    """Put one commit of a model repo into a Hugging Face cache: blobs/, snapshots/<commit>/ links, refs/."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(b"".join(name.encode() + data for name, data in sorted(files.items()))).hexdigest()
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # huggingface_hub writes the bare hash, no newline
    return commit


def adapter_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """The adapter files of a folder (plus a README, which ctm must not need), keyed by repo path."""
    files = {prefix + name: (folder / name).read_bytes() for name in HUB_FILES}
    files["README.md"] = b"# a model card\n"
    return files


# ------------------------------------------------------------------------------------------------ core space


def project(cores: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Coordinates M_t = uᵀ C_t v of every dense core in the frame (u, v) (..., T, r, r)."""
    return matmul(matmul(u.mT.unsqueeze(-3), cores), v.unsqueeze(-3))


def hosvd_energy(cores: cs.FactoredCores, rank: int) -> torch.Tensor:
    """Σ_t ‖uᵀ C_t v‖² (...,) in HOOI's start, the HOSVD: u, v the top-r eigenvectors of Σ C_t C_tᵀ, Σ C_tᵀ C_t."""
    left, right = cores.grams()
    u = torch.linalg.eigh(left).eigenvectors[..., -rank:]
    v = torch.linalg.eigh(right).eigenvectors[..., -rank:]
    return matmul(cores.times_left(u).mT, v.unsqueeze(-3)).square().sum(dim=(-3, -2, -1))
