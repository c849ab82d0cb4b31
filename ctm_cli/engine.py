"""The streaming loop: one group of same-shaped modules at a time, from every adapter, on the device."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import groupby

import torch

from ctm_cli.adapter import Adapter
from ctm_cli.errors import InputError, UsageError
from ctm_cli.methods import FactorGroup, MergeResult, MergeSettings, Method
from ctm_cli.validate import ModuleSpec

COMPUTE_DTYPE = torch.float32
DEFAULT_MAX_MEMORY = 2 * 1024**3


@dataclass(frozen=True)
class ModuleStats:
    """What the report says about one merged module."""

    name: str
    out_features: int
    in_features: int
    ranks: tuple[int, ...]
    output_rank: int
    kept_energy: list[float]
    relative_error: float | None
    sweeps: int | None
    frame_energy: float | None
    truncation_loss: float | None
    seconds: float


@dataclass(frozen=True)
class MergeOutput:
    """The merged factors by weight key, and per-module statistics."""

    tensors: dict[str, torch.Tensor]
    stats: list[ModuleStats]


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bytes_per_module(spec: ModuleSpec) -> int:
    """Working memory of one module on the device: float32 factors, float64 Gram copies, outputs."""
    return (spec.out_features + spec.in_features) * spec.total_rank * (4 + 8 + 4)


def plan_groups(specs: list[ModuleSpec], max_memory: int) -> list[list[ModuleSpec]]:
    """Modules of equal shapes and ranks, chunked so that one group fits the memory budget."""

    def shape_key(spec: ModuleSpec) -> tuple:
        return (spec.out_features, spec.in_features, spec.ranks)

    groups = []
    for _, members in groupby(sorted(specs, key=shape_key), key=shape_key):
        members = list(members)
        size = max(1, max_memory // bytes_per_module(members[0]))
        groups.extend(members[i : i + size] for i in range(0, len(members), size))
    return groups


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


def _factors(adapter: Adapter, spec: ModuleSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, s·B) of one module on the device in the compute dtype; rank-0 zeros where the adapter lacks it."""
    if spec.name not in adapter.modules:
        empty = torch.zeros(0, dtype=COMPUTE_DTYPE, device=device)
        return empty.reshape(0, spec.in_features), empty.reshape(spec.out_features, 0)
    a, b = adapter.factors(spec.name)
    scale = adapter.modules[spec.name].scale
    return a.to(device=device, dtype=COMPUTE_DTYPE), b.to(device=device, dtype=COMPUTE_DTYPE) * scale


def _refuse_non_finite(adapters: list[Adapter], group: list[ModuleSpec], device: torch.device) -> None:
    """Name the first adapter file and module whose (scaled) factors hold NaN or infinite values."""
    for spec in group:
        for adapter in adapters:
            if not _finite(*_factors(adapter, spec, device)):
                raise InputError(f"{adapter.weights_path}: module {spec.name} has NaN or infinite values")


def _load_group(adapters: list[Adapter], group: list[ModuleSpec], device: torch.device) -> FactorGroup:
    b_stack, a_stack = [], []
    for spec in group:
        a_parts, b_parts = zip(*(_factors(adapter, spec, device) for adapter in adapters), strict=True)
        b_stack.append(torch.cat(b_parts, dim=1))
        a_stack.append(torch.cat(a_parts, dim=0))
    b_cat, a_cat = torch.stack(b_stack), torch.stack(a_stack)
    if not _finite(b_cat, a_cat):
        _refuse_non_finite(adapters, group, device)
    return FactorGroup(b_cat=b_cat, a_cat=a_cat, ranks=list(group[0].ranks))


def _refuse_overflow(lora_a: torch.Tensor, lora_b: torch.Tensor, group: list[ModuleSpec], dtype: torch.dtype) -> None:
    """Refuse merged factors that are not finite, in the compute dtype or once cast to the output dtype."""
    name = group[0].name + (f" (and {len(group) - 1} more)" if len(group) > 1 else "")
    if not _finite(lora_a, lora_b):
        raise InputError(f"{name}: the merged factors overflow float32 (input values times --weights too large)")
    if not _finite(lora_a.to(dtype), lora_b.to(dtype)):
        dtype_name = str(dtype).removeprefix("torch.")
        raise UsageError(f"{name}: the merged factors overflow {dtype_name}; use --dtype float32")


def _merge_group(method: Method, factors: FactorGroup, settings: MergeSettings, group: list[ModuleSpec]) -> MergeResult:
    """Run the method on one group; a linear-algebra breakdown (extreme values) becomes a clear usage error."""
    try:
        return method.function(factors, settings)
    except torch.linalg.LinAlgError as exc:
        name = group[0].name + (f" (and {len(group) - 1} more)" if len(group) > 1 else "")
        raise UsageError(
            f"{name}: the merge broke down numerically ({str(exc).splitlines()[0]}); "
            "check --weights and the inputs for extreme values"
        ) from exc


def _output_keys(adapters: list[Adapter], name: str) -> tuple[str, str]:
    """The (A, B) weight keys of a module as the first adapter that has it spells them."""
    module = next(adapter.modules[name] for adapter in adapters if name in adapter.modules)
    return module.a_key, module.b_key


def _optional(values: torch.Tensor | None, index: int, kind: type) -> float | int | None:
    return None if values is None else kind(values[index].item())


def merge_modules(
    adapters: list[Adapter],
    groups: list[list[ModuleSpec]],
    method: Method,
    settings: MergeSettings,
    device: torch.device,
    output_dtype: torch.dtype,
    on_progress: Callable[[int], None] = lambda done: None,
) -> MergeOutput:
    """Merge every group on `device`, keeping only the (small) results on the host."""
    tensors: dict[str, torch.Tensor] = {}
    stats: list[ModuleStats] = []
    weights = settings.weights.to(device)
    settings = replace(settings, weights=weights)
    for group in groups:
        started = time.perf_counter()
        group_settings = replace(settings, rank=method.output_rank(settings.rank, list(group[0].ranks)))
        result = _merge_group(method, _load_group(adapters, group, device), group_settings, group)
        _refuse_overflow(result.lora_a, result.lora_b, group, output_dtype)
        lora_b = result.lora_b.to(device="cpu", dtype=output_dtype)
        lora_a = result.lora_a.to(device="cpu", dtype=output_dtype)
        seconds = (time.perf_counter() - started) / len(group)
        for index, spec in enumerate(group):
            a_key, b_key = _output_keys(adapters, spec.name)
            tensors[a_key] = lora_a[index].contiguous()
            tensors[b_key] = lora_b[index].contiguous()
            stats.append(
                ModuleStats(
                    name=spec.name,
                    out_features=spec.out_features,
                    in_features=spec.in_features,
                    ranks=spec.ranks,
                    output_rank=lora_a.shape[1],
                    kept_energy=[float(x) for x in result.kept_energy[index].tolist()],
                    relative_error=_optional(result.relative_error, index, float),
                    sweeps=_optional(result.sweeps, index, int),
                    frame_energy=_optional(result.frame_energy, index, float),
                    truncation_loss=_optional(result.truncation_loss, index, float),
                    seconds=seconds,
                )
            )
        on_progress(len(group))
    stats.sort(key=lambda s: s.name)
    return MergeOutput(tensors=tensors, stats=stats)
