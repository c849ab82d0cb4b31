"""diffusers / ai-toolkit style: dotted module paths under the pipeline's component (`unet.…`, `text_encoder.…`,
`text_encoder_2.…`, `transformer.…`), then `.lora_A.weight` / `.lora_B.weight` (or the older `.lora.down.weight` /
`.lora.up.weight`), with an optional `.alpha` (scale alpha / r; none: scale 1). Written back as lora_A / lora_B
without alpha (scale exactly 1)."""

from __future__ import annotations

import torch

from ctm_cli.formats.styles import Style, register, shaped

_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".alpha", "alpha"),
    (".lora_magnitude_vector", "lora_magnitude_vector"),
    (".dora_scale", "dora_scale"),
)
# The kohya module prefix of each component whose diffusers paths kohya spells with underscores (SD 1.x/2.x UNet
# and the CLIP text encoders); text_encoder is lora_te1 in a file that also has text_encoder_2 (SDXL).
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def split(key: str) -> tuple[str, str] | None:
    """(module, role) of a diffusers key."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def write(name: str, a: torch.Tensor, b: torch.Tensor, weight_shape: tuple[int, ...] | None) -> dict[str, torch.Tensor]:
    """One merged module in diffusers keys: lora_A and lora_B (in a convolution's layout), no alpha (scale 1)."""
    down, up = shaped(a, b, weight_shape)
    return {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}


def kohya_name(name: str, two_text_encoders: bool) -> str | None:
    """The kohya spelling of a diffusers module path (component prefix, dots as underscores), or None for a
    component kohya names differently (a Flux or SDXL transformer's blocks are other modules in kohya files)."""
    component, _, path = name.partition(".")
    prefix = KOHYA_PREFIXES.get(component)
    if prefix is None or not path:
        return None
    if component == "text_encoder" and two_text_encoders:
        prefix = "lora_te1_"
    return prefix + path.replace(".", "_")


STYLE = register(Style("diffusers", split, write, "diffusers / ai-toolkit: unet.….lora_A.weight, .lora_B.weight"))
