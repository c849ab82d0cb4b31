"""kohya-ss/sd-scripts style (also LyCORIS'): one module name without dots (`lora_unet_…`, `lora_te_…`,
`lora_te1_…`/`lora_te2_…` for SDXL, Flux's `lora_unet_double_blocks_…`), then `.lora_down.weight` (r × in, or
r × in × k × k), `.lora_up.weight` (out × r, or out × r × 1 × 1), `.alpha` (scale alpha / r; none: scale 1), and
LyCORIS' `.lora_mid.weight`, `.hada_*`, `.lokr_*`. Written back with alpha = r per module (scale exactly 1) and
the `ss_*` metadata kohya-style tools read."""

from __future__ import annotations

import json
from collections import Counter

import torch

from ctm_cli.formats.styles import Style, register, shaped

PREFIXES = ("lora_", "lycoris_")
_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha"}
# Metadata of an input that still holds for the merge: what base model it is for.
KEPT_METADATA = ("ss_base_model_version", "ss_v2", "ss_sd_model_name", "modelspec.architecture")


def split(key: str) -> tuple[str, str] | None:
    """(module, role) of a kohya key: the role is a factor's name (down, up, mid, alpha) or LyCORIS' own."""
    module, dot, rest = key.partition(".")
    if not dot or not module.startswith(PREFIXES):
        return None
    return module, _ROLES.get(rest, rest)


def write(name: str, a: torch.Tensor, b: torch.Tensor, weight_shape: tuple[int, ...] | None) -> dict[str, torch.Tensor]:
    """One merged module in kohya's keys: lora_down, lora_up (in a convolution's layout) and alpha = r (scale 1)."""
    down, up = shaped(a, b, weight_shape)
    return {
        f"{name}.lora_down.weight": down,
        f"{name}.lora_up.weight": up,
        f"{name}.alpha": torch.tensor(float(a.shape[0]), dtype=torch.float32),
    }


def _most_common(values: list[int]) -> int:
    return Counter(values).most_common(1)[0][0]


def metadata(inputs: list[dict[str, str]], ranks: dict[str, int], conv: set[str]) -> dict[str, str]:
    """The `ss_*` metadata of a merged kohya file: network module, dim and alpha (the most common rank of the linear
    and 1×1 modules; alpha = dim, scale 1), conv_dim / conv_alpha where `conv` (k × k convolutions) are merged, and
    the first input's base-model fields."""
    linear = [rank for name, rank in ranks.items() if name not in conv]
    dim = _most_common(linear or list(ranks.values()))
    data = {key: inputs[0][key] for key in KEPT_METADATA if key in inputs[0]}
    data.update(ss_network_module="networks.lora", ss_network_dim=str(dim), ss_network_alpha=str(float(dim)))
    if conv:
        conv_dim = _most_common([ranks[name] for name in conv])
        data["ss_network_args"] = json.dumps({"conv_dim": str(conv_dim), "conv_alpha": str(float(conv_dim))})
    data["ss_training_comment"] = f"merged by ctm from {len(inputs)} LoRAs"
    return data


STYLE = register(Style("kohya", split, write, "kohya-ss / LyCORIS: lora_unet_….lora_down.weight, .lora_up.weight"))
