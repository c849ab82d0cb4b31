"""Shared fixtures: a tiny Llama built from a config, real PEFT adapters on it, sandboxes and a local Hugging Face
cache (the helpers they use, and the tests share, are in helpers.py)."""

from __future__ import annotations

import os

# NumPy's OpenBLAS, like torch below, works on tiny matrices here; with two threads its per-call synchronisation
# dwarfs the work (the paper reference's batched 64 × 64 eighs: 52 s of CPU against 2.7 s with one). Set before
# NumPy is first imported (hence the imports below this line).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import ALL_TARGETS, BASE_NAME, build_tiny_llama, save_peft_adapter

# The tests merge tiny matrices: one thread avoids OpenMP start-up and contention costs that dwarf the work.
torch.set_num_threads(1)


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


@pytest.fixture
def out_parent(tmp_path) -> Path:
    """An empty folder that holds only the output (so any stray file or temp folder shows)."""
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A fresh folder holding everything one ctm run could touch, and `refuses` to check a refusal (sandbox.py)."""
    from sandbox import Sandbox

    return Sandbox(tmp_path / "sandbox", monkeypatch)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in a temporary HF_HOME, with HF_HUB_OFFLINE=1.

    huggingface_hub reads these variables once, at import; the module constants are patched to match
    (test_environment_variables_alone checks the variables by themselves in a fresh process)."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for name, value in {"HF_HOME": home, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
