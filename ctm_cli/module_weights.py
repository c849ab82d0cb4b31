"""Per-module weights (a recipe's `module_weights:`, in the spirit of kohya's block weights): regular expressions of
module names, each with one weight per adapter, folded into the scale of each adapter's update of the modules the
first matching pattern finds. No math beyond that product, no I/O."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ctm_cli.errors import UsageError

if TYPE_CHECKING:
    from ctm_cli.adapter import Adapter


def module_weight(patterns: dict[str, list[float]], name: str, index: int) -> float:
    """The weight of adapter `index` at module `name`: from the first pattern found in the name, else 1."""
    for pattern, weights in patterns.items():
        if re.search(pattern, name):
            return weights[index]
    return 1.0


def apply_module_weights(adapters: list[Adapter], patterns: dict[str, list[float]]) -> dict[str, Any]:
    """Multiply each adapter's update of every module by its module weight (through the module's scale), refusing a
    pattern with a weight count other than the adapters' or one that finds no module; returns what the report
    records: per pattern, its weights and the modules it weighted."""
    names = sorted(set().union(*(adapter.modules for adapter in adapters)))
    record: dict[str, Any] = {}
    for pattern, weights in patterns.items():
        if len(weights) != len(adapters):
            raise UsageError(f"module_weights: {pattern!r} has {len(weights)} weights but there are {len(adapters)} "
                             "adapters (give one weight per adapter)")
        matched = [name for name in names if re.search(pattern, name)]
        if not matched:
            raise UsageError(f"module_weights: {pattern!r} matches no module (e.g. {names[0]})")
        owned = [name for name in matched if next(p for p in patterns if re.search(p, name)) == pattern]
        record[pattern] = {"weights": weights, "modules": len(owned)}
    for index, adapter in enumerate(adapters):
        for name, module in list(adapter.modules.items()):
            weight = module_weight(patterns, name, index)
            if weight != 1.0:
                adapter.modules[name] = replace(module, scale=module.scale * weight)
    return record
