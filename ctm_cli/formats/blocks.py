"""What `ctm inspect` says about an input's style: the key style, the LyCORIS kinds of its modules, and how many
modules each block holds (unet / text encoders / transformer, and their down / mid / up or double / single parts)."""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING, Any

from ctm_cli.formats.output import style_of

if TYPE_CHECKING:
    from ctm_cli.adapter import Adapter

_KOHYA_BLOCK = re.compile(r"^(?:lora|lycoris)_(?P<component>unet|te\d?|transformer|[a-z]+)_(?P<part>.*?)(?:_\d|$)")
_PEFT_PREFIX = "base_model.model."


def block_of(name: str, style: str) -> str:
    """A module's block: its component and the part inside it (`unet.down_blocks`, `te1.text_model_encoder_layers`,
    `transformer.single_transformer_blocks`; a PEFT module's path before its first index: `model.layers`)."""
    if style == "kohya":
        found = _KOHYA_BLOCK.match(name)
        return f"{found['component']}.{found['part']}" if found else name
    parts = name.removeprefix(_PEFT_PREFIX).split(".")
    if style == "diffusers":
        return ".".join(parts[:2])
    index = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts))
    return ".".join(parts[: max(index, 1)])


def describe_style(adapter: Adapter) -> dict[str, Any]:
    """The input's style, its module kinds (lora, locon_tucker, loha, lokr) and its module count per block."""
    style = style_of(adapter)
    single = adapter.single_file
    return {
        "style": style,
        "kinds": single.kind_counts() if single is not None else {"lora": len(adapter.modules)},
        "blocks": dict(sorted(Counter(block_of(name, style) for name in adapter.modules).items())),
    }
