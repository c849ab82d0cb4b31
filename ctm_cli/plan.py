"""What a merge will do, for `--dry-run`: modules, groups, device memory and output size (no math, no I/O)."""

from __future__ import annotations

import json
from typing import Any

import torch

from ctm_cli.adapter import Adapter
from ctm_cli.engine import CoreNumbers, group_bytes, wave_bytes
from ctm_cli.methods import Method
from ctm_cli.module_spec import ModuleSpec

# Room for the ctm metadata (settings and input hashes) in the safetensors header; the rest is computed.
METADATA_ALLOWANCE = 2048
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def output_shapes(adapter: Adapter, specs: list[ModuleSpec], method: Method, rank: int) -> dict[str, tuple[int, int]]:
    """Shape of every tensor the merged adapter will hold, by weight key (keys as in `adapter`)."""
    shapes = {}
    for spec in specs:
        module = adapter.modules[spec.name]
        output_rank = method.output_rank(rank, list(spec.ranks))
        shapes[module.a_key] = (output_rank, spec.in_features)
        shapes[module.b_key] = (spec.out_features, output_rank)
    return shapes


def safetensors_bytes(shapes: dict[str, tuple[int, int]], dtype: torch.dtype) -> int:
    """Size of a safetensors file with these tensors: 8-byte length, JSON header (+ metadata allowance), data."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for key in sorted(shapes):
        size = shapes[key][0] * shapes[key][1] * itemsize
        header[key] = {
            "dtype": _SAFETENSORS_DTYPE[dtype],
            "shape": list(shapes[key]),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    return 8 + len(json.dumps(header, separators=(",", ":"))) + METADATA_ALLOWANCE + offset


def describe_plan(
    adapter: Adapter,
    specs: list[ModuleSpec],
    waves: list[list[list[ModuleSpec]]],
    method: Method,
    rank: int,
    dtype: torch.dtype,
    core_numbers: CoreNumbers,
) -> dict[str, Any]:
    """The plan as plain data: every module with its shape and ranks, the device groups (merged a wave at a
    time) and the estimates."""
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
    return {
        "modules": [
            {
                "name": spec.name,
                "shape": [spec.out_features, spec.in_features],
                "ranks": list(spec.ranks),
                "output_rank": method.output_rank(rank, list(spec.ranks)),
            }
            for spec in specs
        ],
        "groups": group_rows,
        "waves": len(waves),
        "estimated_device_bytes": max(wave_bytes(wave, core_numbers) for wave in waves),
        "estimated_output_bytes": safetensors_bytes(output_shapes(adapter, specs, method, rank), dtype),
    }
