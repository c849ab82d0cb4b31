"""The plan of a merge: the memory model of a module on the device, the groups (modules of one shape, stacked)
and waves (groups merged at once) that fit a budget, and the plan `--dry-run` shows. No math, no I/O."""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby
from typing import Any

import torch

from ctm_cli.adapter import Adapter, output_keys
from ctm_cli.methods import Method
from ctm_cli.module_spec import ModuleSpec
from ctm_cli.params import Params
from ctm_cli.safetensors_format import encoded_size

CPU_MAX_MEMORY = 2 * 1024**3
# On CUDA, the default budget is this fraction of the device's memory: HOOI time grows with the number
# of waves (each wave sweeps on its own), so fewer, larger waves are faster.
CUDA_MEMORY_FRACTION = 0.25
# Room for the ctm metadata (settings and input hashes) in the safetensors header; the rest is computed.
METADATA_ALLOWANCE = 2048


def default_max_memory(device: torch.device) -> int:
    """The per-group memory budget when --max-memory is not given: a quarter of a GPU, else 2 GiB."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * CUDA_MEMORY_FRACTION)
    return CPU_MAX_MEMORY


CoreNumbers = Callable[[ModuleSpec], int]


def dense_core_numbers(spec: ModuleSpec) -> int:
    """Float64 numbers of three T × R × R core stacks (the cores, their balanced copy, one product): the core-space
    arrays of a method that forms the cores (Method.core_numbers gives each method's own)."""
    return 3 * len(spec.ranks) * spec.total_rank**2


def method_core_numbers(method: Method, rank: int, method_params: Params) -> CoreNumbers:
    """The core-space memory of `method` per module at the requested rank, as planning needs it."""

    def numbers(spec: ModuleSpec) -> int:
        written_rank = method.output_rank(rank, spec.ranks)
        return method.core_numbers(spec.total_rank, len(spec.ranks), written_rank, method_params)

    return numbers


def bytes_per_module(spec: ModuleSpec, core_numbers: CoreNumbers = dense_core_numbers) -> int:
    """Peak working memory of one module on the device for the core-space methods (ctm, core, cat, mtc
    with a linear rule), with the output rank bounded by R: per column of the (out + in) × R factors,
    the stored factors of this wave and of the one read ahead (2 × 2 bytes in bf16, 8 in float32 worst
    case: 16), float32 factors (4), two float64 copies alive in the core-space and report steps (16)
    and the float32 + float64 outputs (12); plus the method's float64 core-space arrays (`core_numbers`)."""
    columns = (spec.out_features + spec.in_features) * spec.total_rank
    return columns * (16 + 4 + 16 + 12) + core_numbers(spec) * 8


def group_bytes(group: list[ModuleSpec], core_numbers: CoreNumbers = dense_core_numbers) -> int:
    """Planned device memory of a group of same-shaped modules."""
    return len(group) * bytes_per_module(group[0], core_numbers)


def wave_bytes(wave: list[list[ModuleSpec]], core_numbers: CoreNumbers = dense_core_numbers) -> int:
    """Planned device memory of a wave: its groups' together."""
    return sum(group_bytes(group, core_numbers) for group in wave)


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
    used = 0
    for group in plan_groups(specs, max_memory, core_numbers, module_ranks):
        size = group_bytes(group, core_numbers)
        if waves and used + size <= max_memory:
            waves[-1].append(group)
            used += size
        else:
            waves.append([group])
            used = size
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
    dtype: torch.dtype,
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
