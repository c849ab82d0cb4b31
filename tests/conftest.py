"""Shared fixtures: a tiny Llama built from a config, real PEFT adapters on it, and a CLI runner."""

from __future__ import annotations

import os

# NumPy's OpenBLAS, like torch below, works on tiny matrices here; with two threads its per-call synchronisation
# dwarfs the work (the paper reference's batched 64 × 64 eighs: 52 s of CPU against 2.7 s with one). Set before
# NumPy is first imported (hence the imports below this line).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import config_scale
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

# The tests merge tiny matrices: one thread avoids OpenMP start-up and contention costs that dwarf the work.
torch.set_num_threads(1)

SHARED = (Path(__file__).parents[1] / ".." / "shared").resolve()
REAL_ADAPTERS = SHARED / "real-adapters"
needs_shared = pytest.mark.skipif(not REAL_ADAPTERS.is_dir(), reason="../shared not present beside the clone")

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
# Suffixes of the (A, B) factor keys: linear LoRA, then embedding LoRA.
FACTOR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
BASE_NAME = "tiny-llama"
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


@pytest.fixture(scope="session")
def tiny_llama_model():
    """The session's tiny Llama, in memory (copy it before changing it)."""
    return build_tiny_llama()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_llama_model) -> Path:
    """The tiny Llama saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama_model.save_pretrained(folder)
    return folder


@pytest.fixture
def load_base(tiny_llama_dir) -> Callable[[], torch.nn.Module]:
    """A function returning a fresh copy of the base model loaded from its saved folder."""
    from transformers import LlamaForCausalLM

    def load():
        return LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()

    return load


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


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory, tiny_llama_model) -> Callable[..., Path]:
    """Factory of real PEFT LoRA adapters on the tiny Llama, saved with save_pretrained (cached per arguments).

    make_adapter(r=8, alpha=16, use_rslora=False, targets=ALL_TARGETS, seed=0, base_model="tiny-llama",
                 model_overrides=None, rank_pattern=None) -> adapter folder
    """
    cache: dict[tuple, Path] = {}
    models: dict[tuple, torch.nn.Module] = {(): tiny_llama_model}

    def make(
        r: int = 8,
        alpha: float = 16,
        use_rslora: bool = False,
        targets: tuple[str, ...] | list[str] = ALL_TARGETS,
        seed: int = 0,
        base_model: str = BASE_NAME,
        model_overrides: dict | None = None,
        rank_pattern: dict[str, int] | None = None,
    ) -> Path:
        overrides = tuple(sorted((model_overrides or {}).items()))
        patterns = tuple(sorted((rank_pattern or {}).items()))
        key = (r, alpha, use_rslora, tuple(targets), seed, base_model, overrides, patterns)
        if key not in cache:
            if overrides not in models:
                models[overrides] = build_tiny_llama(**dict(overrides))
            folder = tmp_path_factory.mktemp(f"adapter-r{r}-s{seed}")
            save_peft_adapter(
                models[overrides],
                folder,
                seed,
                base_model,
                r=r,
                lora_alpha=alpha,
                use_rslora=use_rslora,
                target_modules=list(targets),
                rank_pattern=dict(patterns),
            )
            cache[key] = folder
        return cache[key]

    return make


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


@pytest.fixture
def out_parent(tmp_path) -> Path:
    """An empty folder that holds only the output (so any stray file or temp folder shows)."""
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent


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


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A fresh folder holding everything one ctm run could touch, and `refuses` to check a refusal (sandbox.py)."""
    from sandbox import Sandbox

    return Sandbox(tmp_path / "sandbox", monkeypatch)
