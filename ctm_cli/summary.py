"""What `ctm inspect` reports about one adapter: config facts, sizes and per-module spectra."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ctm_cli.adapter import MODEL_PREFIX, Adapter
from ctm_cli.core_space import core_space
from ctm_cli.errors import InputError
from ctm_cli.formats import describe_style


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


def summarize(adapter: Adapter) -> dict[str, Any]:
    """Everything `ctm inspect` shows, as plain JSON-able data."""
    config = adapter.config
    modules = []
    parameters = 0
    for name, module in adapter.modules.items():
        a, b = adapter.factors(name)
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise InputError(f"{adapter.weights_path}: module {name} has NaN or infinite values")
        parameters += a.numel() + b.numel()
        spectrum = update_spectrum(a, b, module.scale)
        modules.append(
            {
                "name": name,
                "shape": [module.out_features, module.in_features],
                "rank": module.rank,
                "alpha": module.alpha,
                "scale": module.scale,
                "embedding": module.embedding,
                "norm": float(spectrum.square().sum().sqrt()),
                "effective_rank": effective_rank(spectrum),
                "singular_values": [float(x) for x in spectrum.tolist()],
            }
        )
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
        "target_modules": sorted({module_family(name) for name in adapter.modules}),
        "lora_modules": len(modules),
        "lora_parameters": parameters,
        "modules_to_save": config.get("modules_to_save") or [],
        "other_tensors": adapter.extra_keys,
        "other_parameters": extra_parameters,
        "weights_file": adapter.weights_path.name,
        "file_size": adapter.weights_path.stat().st_size,
        "dtype": sorted(str(d).removeprefix("torch.") for d in adapter.dtypes()),
        "modules": modules,
    }
