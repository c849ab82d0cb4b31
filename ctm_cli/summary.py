"""What `ctm inspect` reports about one adapter: config facts, sizes and per-module spectra."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ctm_cli.adapter import Adapter
from ctm_cli.core_space import core_space
from ctm_cli.errors import InputError
from ctm_cli.formats import describe_style
from ctm_cli.peft_layout import MODEL_PREFIX


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values."""
    total = singular_values.sum()
    if total <= 0:
        return 0.0
    p = singular_values[singular_values > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def update_spectrum(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Singular values of s·B·A from its r × r core, without forming the out × in product (in float64, where
    the largest float32 factors and scales cannot overflow)."""
    b64, a64 = (b.to(torch.float64) * scale).unsqueeze(0), a.to(torch.float64).unsqueeze(0)
    space = core_space(b64, a64, [a.shape[0]])
    return torch.linalg.svdvals(space.cores[0, 0])


def module_family(name: str) -> str:
    """A module name with layer indices folded: `model.layers.*.self_attn.q_proj`."""
    return re.sub(r"\.\d+\.", ".*.", name.removeprefix(MODEL_PREFIX))


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key that orders the numbers inside a name by value: `h.2` before `h.10`."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def common_prefix(names: list[str]) -> str:
    """The dotted path every name starts with (whole components, ending in a dot), leaving each name at least its
    last component: `encoder.layer.` for `encoder.layer.0.query` and `encoder.layer.1.key`."""
    split = [name.split(".")[:-1] for name in names]
    shared: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        shared.append(parts[0])
    return "".join(f"{part}." for part in shared)


def saved_modules(keys: list[str]) -> list[str]:
    """The modules whose full tensors the file holds (a classifier head, an embedding), from those tensors' keys:
    `base_model.model.classifier.weight` → `classifier`."""
    names = {key.removeprefix(MODEL_PREFIX).rsplit(".", 1)[0].replace(".modules_to_save.default", "") for key in keys}
    return sorted(names, key=natural_key)


def summarize(adapter: Adapter) -> dict[str, Any]:
    """What `ctm inspect` shows, as plain JSON-able data, from the config and the file's header only (no tensor
    is read, and torch is not loaded); `add_spectra` adds the per-module spectra."""
    config = adapter.config
    names = sorted(adapter.modules, key=natural_key)
    modules: list[dict[str, Any]] = [
        {
            "name": name,
            "shape": [module.out_features, module.in_features],
            "rank": module.rank,
            "alpha": module.alpha,
            "scale": module.scale,
            "embedding": module.embedding,
        }
        for name, module in ((name, adapter.modules[name]) for name in names)
    ]
    parameters = sum(m["rank"] * (m["shape"][0] + m["shape"][1]) for m in modules)
    extra_parameters = sum(math.prod(adapter.shape(key)) for key in adapter.extra_keys)
    return {
        "path": str(adapter.folder),
        **describe_style(adapter),  # style, kinds, blocks (ctm_cli/formats)
        "base_model": adapter.base_model,
        "peft_type": config.get("peft_type"),
        "r": config["r"],
        "rank_pattern": config.get("rank_pattern") or {},
        "lora_alpha": config["lora_alpha"],
        "alpha_pattern": config.get("alpha_pattern") or {},
        "use_rslora": adapter.use_rslora,
        "scale": sorted({m["scale"] for m in modules}),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
        "target_modules_config": config.get("target_modules"),
        "target_modules": sorted({module_family(name) for name in adapter.modules}, key=natural_key),
        "lora_modules": len(modules),
        "lora_parameters": parameters,
        "modules_to_save": config.get("modules_to_save") or [],
        "saved_modules": saved_modules(adapter.extra_keys),
        "other_tensors": adapter.extra_keys,
        "other_parameters": extra_parameters,
        "weights_file": adapter.weights_path.name,
        "file_size": adapter.weights_path.stat().st_size,
        "dtype": sorted(adapter.dtypes()),
        "modules": modules,
    }


def add_spectra(adapter: Adapter, info: dict[str, Any]) -> None:
    """Add each module's spectrum of s·B·A to `info["modules"]` (norm, effective rank, singular values): reads
    every factor (refusing NaN or infinite values) and loads torch."""
    for entry in info["modules"]:
        module = adapter.modules[entry["name"]]
        a, b = adapter.factors(module.name)
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise InputError(f"{adapter.weights_path}: module {module.name} has NaN or infinite values")
        spectrum = update_spectrum(a, b, module.scale)
        entry["norm"] = float(spectrum.square().sum().sqrt())
        entry["effective_rank"] = effective_rank(spectrum)
        entry["singular_values"] = [float(x) for x in spectrum.tolist()]
