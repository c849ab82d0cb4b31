"""What a PEFT LoRA adapter looks like on disk: its file names, the prefix of its module names, the dtypes of its
factors, and the record of one LoRA module that every reader (adapter.py, formats/) makes. No I/O: a leaf that
both sides import, so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass

from ctm_cli.safetensors_format import FLOAT_NAMES

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
LEGACY_NAME = "adapter_model.bin"
ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_NAME, LEGACY_NAME)  # what a PEFT adapter folder holds
MODEL_PREFIX = "base_model.model."  # before every module name in PEFT's weight keys
FLOAT_DTYPES = frozenset(FLOAT_NAMES.values())  # the factor dtypes ctm reads, by name: float32, ...


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module of an adapter: where its factors live and how they scale."""

    name: str
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float
    out_features: int
    in_features: int
    embedding: bool
