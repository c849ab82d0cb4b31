"""The plan of a merge: the memory model of a module on the device, the groups (modules of one shape, stacked)
and waves (groups merged at once) that fit a budget, and the plan `--dry-run` shows. No math, no I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch

from ctm_cli.adapter import Adapter, output_keys
from ctm_cli.methods import CoreMemory, Method
from ctm_cli.module_spec import ModuleSpec
from ctm_cli.params import Params
from ctm_cli.rules import Rule
from ctm_cli.safetensors_format import FORMAT_NAMES, ITEM_SIZES, encoded_size

CPU_MAX_MEMORY = 2 * 1024**3
# On CUDA, the default budget is this fraction of the device's memory: HOOI time grows with the number
# of waves (each wave sweeps on its own), so fewer, larger waves are faster.
CUDA_MEMORY_FRACTION = 0.25
# Room for the ctm metadata (settings and input hashes) in the safetensors header; the rest is computed.
METADATA_ALLOWANCE = 2048
# Offsets of the factors in the engine's staging buffers are multiples of this (any dtype can be viewed there).
ALIGNMENT = 64


def default_max_memory(device: str) -> int:
    """The per-group memory budget when --max-memory is not given on `device` (cpu, cuda, cuda:N): a quarter of a
    GPU, else 2 GiB."""
    if device.startswith("cuda"):
        return int(torch.cuda.get_device_properties(device).total_memory * CUDA_MEMORY_FRACTION)
    return CPU_MAX_MEMORY


@dataclass(frozen=True)
class ModuleMemory:
    """Device bytes of one module while its wave merges: `kept` stay allocated for the whole wave (its stored and
    float32 factors, the method's arrays that outlive its group's step, its output), `working` only while its own
    group is merged (the groups of a wave are merged one after another)."""

    kept: int
    working: int

    @property
    def alone(self) -> int:
        """The module's peak when its group is the one being merged."""
        return self.kept + self.working


CoreNumbers = Callable[[ModuleSpec], ModuleMemory]
# The largest stored element (float64): the default where the inputs' dtypes are not known.
WIDEST_STORED_ITEMSIZE = 8


def stored_itemsize(adapters: list[Adapter]) -> int:
    """Bytes of the widest stored factor element of the inputs (what the engine's staging buffers hold: a factor
    of no stored dtype is staged as float32)."""
    names = {
        adapter.dtype(key) or "float32"
        for adapter in adapters
        for module in adapter.modules.values()
        for key in (module.a_key, module.b_key)
    }
    return max((ITEM_SIZES[FORMAT_NAMES[name]] for name in names), default=ITEM_SIZES["F32"])


def dense_core_numbers(spec: ModuleSpec, stored: int = WIDEST_STORED_ITEMSIZE) -> ModuleMemory:
    """The memory of a method that forms three T × R × R float64 core stacks while its group merges (the
    default of `Method.core_numbers`), with the inputs stored in the widest dtype."""
    return module_memory(spec, spec.total_rank, CoreMemory(0, 3 * len(spec.ranks) * spec.total_rank**2), stored)


def method_core_numbers(
    method: Method, rule: Rule[Any], rank: int, method_params: Params, stored: int = WIDEST_STORED_ITEMSIZE
) -> CoreNumbers:
    """The memory model of `method` with `rule` per module at the requested rank, inputs stored in `stored` bytes
    per element, as planning needs it."""

    def numbers(spec: ModuleSpec) -> ModuleMemory:
        written_rank = method.output_rank(rank, spec.ranks)
        core = method.core_numbers(spec.ranks, written_rank, rule, method_params)
        return module_memory(spec, written_rank, core, stored)

    return numbers


def module_memory(spec: ModuleSpec, written_rank: int, core: CoreMemory, stored: int) -> ModuleMemory:
    """Device bytes of one module for the core-space methods, from its core-space arrays (`core`, float64).

    Kept for the wave, per column of the (out + in) × R factors: the stored factors of this wave and of the one
    read ahead (2 × `stored` bytes, each factor padded to the staging buffers' alignment) and the float32 factors
    (4); per column of the (out + in) × r output: the float32 output and its cast (8). Working while the group
    merges, per factor column: the method's float64 copies of the factors (8 each, `core.factor_copies`: the core
    space's Gram step; the report's float64 factors, B scaled for a linear rule's error), and per output column the
    report's float64 copies of the output and of its concatenation with the factors (16)."""
    columns = (spec.out_features + spec.in_features) * spec.total_rank
    output_columns = (spec.out_features + spec.in_features) * written_rank
    padding = 2 * 2 * len(spec.ranks) * ALIGNMENT if stored else 0  # two waves' A and B of every input
    return ModuleMemory(
        kept=columns * (2 * stored + 4) + padding + output_columns * 8 + core.kept * 8,
        working=columns * 8 * core.factor_copies + output_columns * 16 + core.working * 8,
    )


def bytes_per_module(spec: ModuleSpec, core_numbers: CoreNumbers = dense_core_numbers) -> int:
    """Peak device memory of one module merged alone (`ModuleMemory.alone`)."""
    return core_numbers(spec).alone


def group_bytes(group: list[ModuleSpec], core_numbers: CoreNumbers = dense_core_numbers) -> int:
    """Planned device memory of a group of same-shaped modules merged alone."""
    return len(group) * bytes_per_module(group[0], core_numbers)


def wave_bytes(wave: list[list[ModuleSpec]], core_numbers: CoreNumbers = dense_core_numbers) -> int:
    """Planned device memory of a wave: what every group keeps for the wave, plus the largest working memory of
    one group (groups are merged one after another)."""
    memories = [(len(group), core_numbers(group[0])) for group in wave]
    return sum(size * memory.kept for size, memory in memories) + max(
        (size * memory.working for size, memory in memories), default=0
    )


def plan_groups(
    specs: list[ModuleSpec],
    max_memory: int,
    core_numbers: CoreNumbers = dense_core_numbers,
    module_ranks: dict[str, int] | None = None,
) -> list[list[ModuleSpec]]:
    """Modules of equal shapes and ranks (and requested output ranks, where `module_ranks` gives them per module),
    chunked so that one group fits the memory budget."""

    def shape_key(spec: ModuleSpec) -> tuple:
        return (spec.out_features, spec.in_features, spec.ranks, (module_ranks or {}).get(spec.name, 0))

    groups: list[list[ModuleSpec]] = []
    for _, same_shape in groupby(sorted(specs, key=shape_key), key=shape_key):
        members = list(same_shape)
        size = max(1, max_memory // bytes_per_module(members[0], core_numbers))
        groups.extend(members[i : i + size] for i in range(0, len(members), size))
    return groups


def plan_waves(
    specs: list[ModuleSpec],
    max_memory: int,
    core_numbers: CoreNumbers = dense_core_numbers,
    module_ranks: dict[str, int] | None = None,
) -> list[list[list[ModuleSpec]]]:
    """The groups of `plan_groups` packed in order into waves that fit the budget together: a wave is read
    and merged at once, so a method that merges groups together (ctm's one HOOI) sweeps once per wave."""
    waves: list[list[list[ModuleSpec]]] = []
    for group in plan_groups(specs, max_memory, core_numbers, module_ranks):
        if waves and wave_bytes([*waves[-1], group], core_numbers) <= max_memory:
            waves[-1].append(group)
        else:
            waves.append([group])
    return waves


def output_shapes(
    adapters: list[Adapter], specs: list[ModuleSpec], written_ranks: dict[str, int]
) -> dict[str, tuple[int, int]]:
    """Shape of every tensor the merged adapter will hold, by weight key (`adapter.output_keys`)."""
    shapes = {}
    for spec in specs:
        (a_key, b_key), rank = output_keys(adapters, spec.name), written_ranks[spec.name]
        shapes[a_key] = (rank, spec.in_features)
        shapes[b_key] = (spec.out_features, rank)
    return shapes


def describe_plan(
    adapters: list[Adapter],
    specs: list[ModuleSpec],
    waves: list[list[list[ModuleSpec]]],
    written_ranks: dict[str, int],
    dtype: str,
    core_numbers: CoreNumbers,
) -> dict[str, Any]:
    """The plan as plain data: every module with its shape, input ranks and written rank, the device groups (merged
    a wave at a time) and the estimates."""
    group_rows = [
        {
            "wave": wave_index,
            "shape": [group[0].out_features, group[0].in_features],
            "ranks": list(group[0].ranks),
            "modules": len(group),
            "device_bytes": group_bytes(group, core_numbers),
        }
        for wave_index, wave in enumerate(waves)
        for group in wave
    ]
    shapes = output_shapes(adapters, specs, written_ranks)
    return {
        "modules": [
            {
                "name": spec.name,
                "shape": [spec.out_features, spec.in_features],
                "ranks": list(spec.ranks),
                "written_rank": written_ranks[spec.name],
            }
            for spec in specs
        ],
        "groups": group_rows,
        "waves": len(waves),
        "estimated_device_bytes": max(wave_bytes(wave, core_numbers) for wave in waves),
        "estimated_output_bytes": encoded_size(shapes, dtype, METADATA_ALLOWANCE),
    }
