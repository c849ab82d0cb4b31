"""Non-LoRA tensors that adapters carry (`modules_to_save` heads, PEFT's saved embedding base layers) and
which of them the merged adapter keeps: refused by default, or dropped, taken from the first adapter, or averaged."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from ctm_cli.adapter import Adapter
from ctm_cli.errors import IncompatibleError, InputError
from ctm_cli.peft_layout import MODEL_PREFIX
from ctm_cli.recipe import EXTRA_TENSOR_POLICIES

BASE_LAYER = ".base_layer."
SHOWN = 3


@dataclass(frozen=True)
class KeptTensors:
    """The non-LoRA tensors to write under their original keys, the `modules_to_save` they need, and a log."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    report: list[dict[str, Any]] = field(default_factory=list)


def _carriers(adapters: list[Adapter]) -> dict[str, list[Adapter]]:
    carriers: dict[str, list[Adapter]] = {}
    for adapter in adapters:
        for key in adapter.extra_keys:
            carriers.setdefault(key, []).append(adapter)
    return carriers


def _load(adapter: Adapter, key: str) -> torch.Tensor:
    """A stored tensor as a contiguous copy of its own (a legacy .bin may hold views of shared storage)."""
    tensor = adapter.tensor(key).clone(memory_format=torch.contiguous_format)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InputError(f"{adapter.weights_path}: tensor {key} has NaN or infinite values")
    return tensor


def _identical(adapters: list[Adapter], key: str) -> bool:
    first = _load(adapters[0], key)
    return all(torch.equal(first, _load(other, key)) for other in adapters[1:])


def _refuse(key_carriers: dict[str, list[Adapter]]) -> None:
    keys = list(key_carriers)
    holder = key_carriers[keys[0]][0]
    shown = ", ".join(keys[:SHOWN]) + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")
    raise IncompatibleError(
        f"{holder.weights_path}: carries non-LoRA tensors ({shown}) from modules_to_save or saved base layers; "
        f"ctm will not drop or merge them silently: choose --modules-to-save {'|'.join(EXTRA_TENSOR_POLICIES)}"
    )


def _mean(adapters: list[Adapter], key: str) -> torch.Tensor:
    shapes = [adapter.shape(key) for adapter in adapters]
    for adapter, shape in zip(adapters[1:], shapes[1:], strict=True):
        if shape != shapes[0]:
            raise IncompatibleError(
                f"{adapter.weights_path}: tensor {key} has shape {'×'.join(map(str, shape))} but "
                f"{'×'.join(map(str, shapes[0]))} in {adapters[0].weights_path}; "
                "--modules-to-save mean needs equal shapes (choose first or drop)"
            )
    tensors = [_load(adapter, key) for adapter in adapters]
    total = sum((tensor.to(torch.float64) for tensor in tensors), torch.zeros(shapes[0], dtype=torch.float64))
    return (total / len(tensors)).to(functools.reduce(torch.promote_types, (tensor.dtype for tensor in tensors)))


def _entry(key: str, action: str, adapters: list[Adapter]) -> dict[str, Any]:
    return {"key": key, "action": action, "from": [adapter.source for adapter in adapters]}


def _covered(path: str, names: list[str]) -> bool:
    """Whether PEFT's `modules_to_save` matching (a module path ending in a name) wraps `path` or a parent."""
    parts = path.split(".")
    return any(".".join(parts[:end]).endswith(name) for end in range(1, len(parts) + 1) for name in names)


def _modules_to_save(adapters: list[Adapter], kept: list[str]) -> list[str] | None:
    heads = [key for key in kept if BASE_LAYER not in key]
    if not heads:
        return None
    names = list(dict.fromkeys(name for a in adapters for name in (a.config.get("modules_to_save") or [])))
    for key in heads:
        module = key.removeprefix(MODEL_PREFIX).rpartition(".")[0]
        if not _covered(module, names):
            names.append(module)
    return names


def keep_extra_tensors(adapters: list[Adapter], policy: str | None) -> KeptTensors:
    """Apply the `--modules-to-save` policy to every non-LoRA tensor of the inputs.

    Without a policy, base-layer copies that every carrier holds identically are kept (nothing is lost or
    chosen); anything else is refused with a message naming the tensors and the choices.
    """
    carriers = _carriers(adapters)
    if policy is None:
        undecided = {
            key: holders for key, holders in carriers.items() if BASE_LAYER not in key or not _identical(holders, key)
        }
        if undecided:
            _refuse(undecided)
    if policy == "drop":
        return KeptTensors(report=[_entry(key, "dropped", holders) for key, holders in carriers.items()])
    tensors, report = {}, []
    for key, holders in carriers.items():
        if policy == "mean":
            tensors[key], used = _mean(holders, key), holders
        else:
            tensors[key], used = _load(holders[0], key), holders[:1]
        report.append(_entry(key, policy or "identical copy", used))
    return KeptTensors(tensors=tensors, modules_to_save=_modules_to_save(adapters, list(tensors)), report=report)
