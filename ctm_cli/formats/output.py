"""The style a merge is written in (`--format`), names made common when inputs of two styles are merged together,
and the files of the written adapter: a PEFT folder's config and weights, or one kohya / diffusers file."""

from __future__ import annotations

import functools
import json
import math
from typing import TYPE_CHECKING, Any

import torch

from ctm_cli.errors import IncompatibleError, UsageError
from ctm_cli.formats import kohya
from ctm_cli.formats.diffusers import kohya_name
from ctm_cli.formats.single_file import FACTOR_KEYS
from ctm_cli.formats.styles import STYLES
from ctm_cli.peft_layout import CONFIG_NAME, SAFETENSORS_NAME

if TYPE_CHECKING:
    from ctm_cli.adapter import Adapter
    from ctm_cli.writer import WeightFile

PEFT = "peft"
FORMATS = ("auto", PEFT, *STYLES)  # what --format takes


def style_of(adapter: Adapter) -> str:
    """An input's style: peft for a PEFT folder, else its single file's key style."""
    return PEFT if adapter.single_file is None else adapter.single_file.style


def align_names(adapters: list[Adapter]) -> None:
    """Let inputs of two styles merge: diffusers names are renamed to kohya's (component prefix, dots as
    underscores) when kohya files are merged too; a PEFT folder merges with PEFT folders only. Modules whose
    names still differ are refused by the compatibility check, which names them."""
    styles = {style_of(adapter) for adapter in adapters}
    if len(styles) == 1:
        return
    if PEFT in styles:
        shown = "; ".join(f"{adapter.source} is {style_of(adapter)}" for adapter in adapters)
        raise IncompatibleError(f"PEFT folders and single-file LoRAs name modules differently ({shown}); ctm maps "
                                "diffusers names onto kohya names only")
    for adapter in adapters:
        single = adapter.single_file
        if single is not None and single.style == "diffusers":
            single.rename(functools.partial(kohya_name, two_text_encoders=_two_encoders(list(single.modules))))
            single.style = "kohya"
            adapter.modules = single.modules


def output_style(requested: str | None, adapters: list[Adapter]) -> str:
    """The style to write: the inputs' (`auto`, None), or the one asked for where the names allow it (diffusers
    files written as kohya, every module renamed by `kohya_name`)."""
    own = style_of(adapters[0])  # align_names left one style
    chosen = own if requested in (None, "auto") else str(requested)
    if chosen == own:
        return chosen
    if own == "diffusers" and chosen == "kohya":
        names = sorted(set().union(*(adapter.modules for adapter in adapters)))
        unmapped = [name for name in names if kohya_name(name, _two_encoders(names)) is None]
        if unmapped:
            raise UsageError(f"--format kohya: module {unmapped[0]} has no kohya name (kohya spells only unet, "
                             "text_encoder and text_encoder_2 paths this way); write it as diffusers")
        return chosen
    if own == PEFT:
        why = "PEFT module paths are written as PEFT only"
    elif chosen == PEFT:
        why = "a PEFT folder needs the base model's module paths, which single files do not hold"
    else:
        why = "kohya names (dots replaced by underscores) cannot be turned back into diffusers paths"
    raise UsageError(f"--format {chosen}: the inputs are {own}; {why}")


def _two_encoders(names: list[str]) -> bool:
    """Whether diffusers names include a second text encoder (SDXL: kohya then names the first lora_te1)."""
    return any(name.startswith("text_encoder_2.") for name in names)


def _module_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(key[: -len(FACTOR_KEYS[0])] for key in tensors if key.endswith(FACTOR_KEYS[0]))


def adapter_files(
    style: str,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    metadata: dict[str, str],
    adapters: list[Adapter],
    stem: str,
) -> dict[str, WeightFile]:
    """The files holding the merged adapter, by name: adapter_config.json and adapter_model.safetensors for PEFT,
    else one `<stem>.safetensors` in the style's keys (convolutions in their kernel layout, scale 1 everywhere)."""
    if style == PEFT:
        return {SAFETENSORS_NAME: (tensors, metadata), CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True) + "\n"}
    shapes: dict[str, tuple[int, ...] | None] = {}
    for adapter in adapters:
        if adapter.single_file is not None:
            for name, shape in adapter.single_file.weight_shapes.items():
                shapes[name] = shapes.get(name) or shape
    names = _module_names(tensors)
    two_encoders = _two_encoders(names)

    def renamed(name: str) -> str:
        return name if style == style_of(adapters[0]) else kohya_name(name, two_encoders) or name

    written: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name in names:
        a, b = tensors[name + FACTOR_KEYS[0]], tensors[name + FACTOR_KEYS[1]]
        written.update(STYLES[style].write(renamed(name), a, b, shapes.get(name)))
        ranks[renamed(name)] = a.shape[0]
    if style == "kohya":
        conv = {renamed(name) for name in names if math.prod((shapes.get(name) or ())[2:]) > 1}  # k × k kernels
        inputs = [adapter.single_file.metadata if adapter.single_file else {} for adapter in adapters]
        metadata = {**metadata, **kohya.metadata(inputs, ranks, conv)}
    return {f"{stem}.safetensors": (written, metadata)}
