"""The streaming loop: one wave of module groups (a group = modules of one shape, stacked) at a time, from
every adapter, on the device. A wave holds as many groups as the memory budget allows (plan.py), so that a
method that merges groups together (ctm: one HOOI for all shapes) runs once per wave.

While a wave is merged, a background thread reads the next wave's factors with plain file reads at
the offsets in each safetensors header (never through mmap, whose touched pages would count in this
process's memory for every input). On the CPU they go into one of two staging buffers, so host memory holds two
waves' stored factors plus the merged output, whatever the number of adapters; on a GPU they go through small
page-locked chunks, each copied to the device on a side stream while the next is read, so the host holds only those.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import torch

from ctm_cli import progress
from ctm_cli.adapter import Adapter, output_keys
from ctm_cli.core_space import column_slices
from ctm_cli.errors import InputError, UsageError
from ctm_cli.fixed_order import single_threaded
from ctm_cli.methods import FactorGroup, MergeResult, MergeSettings, Method
from ctm_cli.module_spec import ModuleSpec
from ctm_cli.plan import ALIGNMENT
from ctm_cli.rules import RuleError
from ctm_cli.safetensors_format import PlainReads, torch_dtype

COMPUTE_DTYPE = "float32"  # by name (torch_dtype), so that importing the engine does not load torch
Number = TypeVar("Number", int, float)
# Input files read at once by the engine's reader.
READ_THREADS = 8
# Bytes read at a time into page-locked host memory on their way to a GPU (each chunk's copy runs during the next read).
STAGING_CHUNK = 4 * 1024**2


@dataclass(frozen=True)
class ModuleStats:
    """What the report says about one merged module."""

    name: str
    out_features: int
    in_features: int
    ranks: tuple[int, ...]
    written_rank: int
    kept_energy: list[float]
    relative_error: float | None
    sweeps: int | None
    frame_energy: float | None
    truncation_loss: float | None
    full_rank_loss: float | None
    seconds: float


@dataclass(frozen=True)
class MergeOutput:
    """The merged factors by weight key, and per-module statistics."""

    tensors: dict[str, torch.Tensor]
    stats: list[ModuleStats]


# ------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class _Piece:
    """One stored factor inside a group's staging buffer."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize

    def view(self, data: torch.Tensor) -> torch.Tensor:
        """The factor as a tensor viewing `data` (the staging buffer or its copy on the device)."""
        return data[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


class _AdapterTensors:
    """Tensors of an adapter read through it: a legacy .bin (already in memory), or a single-file LoRA's factors
    (built from its stored tensors: ctm_cli/formats)."""

    def __init__(self, adapter: Adapter):
        self._adapter = adapter

    def describe(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of a stored tensor."""
        return torch_dtype(self._adapter.dtype(key) or "float32"), self._adapter.shape(key)

    def data_range(self, key: str) -> None:
        """None: its tensors are built, not stored as bytes to read in one go."""

    def read_into(self, key: str, target: torch.Tensor) -> None:
        """Copy the tensor's bytes into `target` (a uint8 host tensor of exactly its size)."""
        tensor = self._adapter.tensor(key)
        target.view(tensor.dtype).view(tensor.shape).copy_(tensor)

    def close(self) -> None:
        """Nothing to close."""


def _tensor_source(adapter: Adapter) -> PlainReads | _AdapterTensors:
    if adapter.weights_path.suffix == ".safetensors" and adapter.single_file is None:  # read as stored
        return PlainReads(adapter.weights_path)
    return _AdapterTensors(adapter)


# Per adapter, per module of a group, its (A, B) pieces; None where the adapter lacks the group.
_GroupPieces = list[list[tuple[_Piece, _Piece]] | None]


@dataclass(frozen=True)
class _RawGroup:
    """A group's stored factors in one byte buffer (on the device, or the host buffer on the CPU):
    per adapter, per module, the (A, B) pieces, or None where the adapter lacks the modules; and the
    per-module LoRA scales (T, G)."""

    data: torch.Tensor
    pieces: _GroupPieces
    scales: torch.Tensor


@dataclass
class _Span:
    """Bytes of one input read in one go into the staging buffer at `offset`: a run of tensors stored side by side
    (`begin`: where it starts in the file's data), or one tensor an adapter builds (`key`)."""

    offset: int
    size: int
    begin: int | None
    key: str


def _read_part(source: PlainReads | _AdapterTensors, run: _Span, start: int, target: torch.Tensor) -> None:
    """Bytes `start` to `start + len(target)` of a span into `target` (a uint8 host tensor); a tensor an adapter
    builds is read whole."""
    if isinstance(source, _AdapterTensors) or run.begin is None:
        assert isinstance(source, _AdapterTensors) and start == 0, "a stored tensor has a byte range"
        source.read_into(run.key, target)
    else:
        source.read_range(run.begin + start, target, f"the data from tensor {run.key} on")


def _read_span(source: PlainReads | _AdapterTensors, run: _Span, data: torch.Tensor) -> None:
    """One span into its place in `data`: straight in on the host; to a device through page-locked chunks, each
    copied asynchronously (on the thread's current stream) while the next is read. The host allocator keeps a chunk
    from reuse until its copy is done."""
    if data.device.type == "cpu":
        _read_part(source, run, 0, data[run.offset : run.offset + run.size])
        return
    step = STAGING_CHUNK if run.begin is not None else run.size
    for start in range(0, run.size, step):
        staged = torch.empty(min(step, run.size - start), dtype=torch.uint8, pin_memory=True)
        _read_part(source, run, start, staged)
        data[run.offset + start : run.offset + start + staged.numel()].copy_(staged, non_blocking=True)


def _continues(run: _Span, stored: tuple[int, int] | None) -> bool:
    """Whether a tensor stored at `stored` follows `run` in its file, so one read takes both."""
    return stored is not None and run.begin is not None and run.begin + run.size == stored[0]


def _group_keys(adapter: Adapter, group: list[ModuleSpec]) -> list[str]:
    """The (A, B) keys of a group's modules in `adapter`, none where it lacks the group."""
    if group[0].name not in adapter.modules:
        return []
    return [key for spec in group for key in (adapter.modules[spec.name].a_key, adapter.modules[spec.name].b_key)]


def _aligned(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


class WaveStream:
    """The waves' raw factors in order (one _RawGroup per group, all in one buffer), each next wave read and
    sent to the device by a background thread while the caller merges the current one. Use as a context
    manager."""

    def __init__(self, adapters: list[Adapter], waves: list[list[list[ModuleSpec]]], device: torch.device):
        self._adapters, self._waves, self._device = adapters, waves, device
        self._sources = [_tensor_source(adapter) for adapter in adapters]
        self._buffers = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctm-read")
        # the files themselves are read in parallel (file reads release the GIL)
        self._files = ThreadPoolExecutor(max_workers=min(READ_THREADS, len(adapters)), thread_name_prefix="ctm-file")
        groups = [group for wave in waves for group in wave]
        self._total_bytes = sum(
            adapter.nbytes(key) for group in groups for adapter in adapters for key in _group_keys(adapter, group)
        )
        self._read_bytes = 0
        self._count_lock = threading.Lock()

    def __enter__(self) -> WaveStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)
        self._files.shutdown(wait=True, cancel_futures=True)
        for source in self._sources:
            source.close()

    def __iter__(self) -> Iterator[list[_RawGroup]]:
        if not self._waves:
            return
        pending = self._reader.submit(self._fetch, 0)
        for index in range(len(self._waves)):
            raws = pending.result()
            if index + 1 < len(self._waves):
                pending = self._reader.submit(self._fetch, index + 1)
            if self._copy_stream is not None:  # copied already; keep the side stream from reusing the memory early
                for tensor in (raws[0].data, *(raw.scales for raw in raws)):
                    tensor.record_stream(torch.cuda.current_stream(self._device))
            yield raws

    def _layout(self, wave: list[list[ModuleSpec]]) -> tuple[list[_GroupPieces], list[list[_Span]], int]:
        """Where every factor of a wave goes in the staging buffer: per group, per adapter, per module, its (A, B)
        pieces; per input, the spans to read (tensors in the order the file stores them, those stored side by side
        in one span, so a wave that needs a whole file reads it in one go); and the buffer's size."""
        placed: dict[tuple[int, str], _Piece] = {}
        spans: list[list[_Span]] = []
        offset = 0
        for index, (source, adapter) in enumerate(zip(self._sources, self._adapters, strict=True)):
            keys = [key for group in wave for key in _group_keys(adapter, group)]
            ranges = {key: source.data_range(key) for key in keys}
            keys.sort(key=lambda key: (ranges[key] or (0, 0))[0])  # built tensors: as listed (a stable sort)
            runs: list[_Span] = []
            for key in keys:
                piece, stored = _Piece(offset, *source.describe(key)), ranges[key]
                if runs and _continues(runs[-1], stored) and offset % piece.dtype.itemsize == 0:
                    runs[-1].size += piece.nbytes
                else:
                    offset = _aligned(offset)
                    piece = replace(piece, offset=offset)
                    runs.append(_Span(offset, piece.nbytes, None if stored is None else stored[0], key))
                placed[index, key] = piece
                offset += piece.nbytes
            spans.append(runs)
        pieces = [
            [
                [(placed[index, a], placed[index, b]) for a, b in zip(keys[::2], keys[1::2], strict=True)] or None
                for index, keys in enumerate(_group_keys(adapter, group) for adapter in self._adapters)
            ]
            for group in wave
        ]
        return pieces, spans, offset

    def _read_wave(self, spans: list[list[_Span]], data: torch.Tensor) -> None:
        """Read every input's spans into their places in `data` (the host buffer, or the device's), one thread per
        file; copies to the device are queued on the side stream, which the caller waits for."""

        def read_file(source: PlainReads | _AdapterTensors, runs: list[_Span]) -> None:
            with self._on_copy_stream():
                for run in runs:
                    _read_span(source, run, data)
                    self._count_read(run.size)

        for done in [self._files.submit(read_file, *job) for job in zip(self._sources, spans, strict=True)]:
            done.result()

    def _on_copy_stream(self) -> AbstractContextManager[object]:
        """The side stream made the calling thread's current one (on a GPU), for copies that overlap the merge."""
        return nullcontext() if self._copy_stream is None else torch.cuda.stream(self._copy_stream)

    def _scales(self, group: list[ModuleSpec]) -> torch.Tensor:
        """The group's LoRA scales (T, G), 0 where an adapter lacks the modules."""
        return torch.tensor(
            [[a.modules[s.name].scale if s.name in a.modules else 0.0 for s in group] for a in self._adapters],
            dtype=torch_dtype(COMPUTE_DTYPE),
        )

    def _count_read(self, count: int) -> None:
        """Add `count` bytes read, and tell the progress listeners."""
        with self._count_lock:
            self._read_bytes += count
            progress.emit("reading", self._read_bytes, self._total_bytes, "bytes")

    def _fetch(self, index: int) -> list[_RawGroup]:
        """Read wave `index` onto the device, or on the CPU into its staging buffer (two, used in turn)."""
        wave = self._waves[index]
        layouts, spans, size = self._layout(wave)
        scales = [self._scales(group) for group in wave]
        if self._copy_stream is None:
            slot = index % 2
            if self._buffers[slot].numel() < size:
                self._buffers[slot] = torch.empty(size, dtype=torch.uint8)
            data = self._buffers[slot][:size]
        else:
            with self._on_copy_stream():
                data = torch.empty(size, dtype=torch.uint8, device=self._device)
                scales = [each.to(self._device) for each in scales]
        self._read_wave(spans, data)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        return [_RawGroup(data, pieces, each) for pieces, each in zip(layouts, scales, strict=True)]


# ------------------------------------------------------------------------------------------ merging


def _finite(*tensors: torch.Tensor) -> bool:
    """Whether every value is finite. A finite sum proves it (NaN and ±inf propagate) in one pass without a
    boolean copy; only a sum that overflowed needs the element-wise check."""
    return all(bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all()) for tensor in tensors)


def _task_factors(raw: _RawGroup, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, s·B) of one adapter for every module of the group, (G, r_t, in) and (G, out, r_t), float32."""
    rows = raw.pieces[task]
    if rows is None:
        raise ValueError(f"input {task} has none of this group's modules")
    a = torch.stack([a_piece.view(raw.data) for a_piece, _ in rows]).to(torch_dtype(COMPUTE_DTYPE))
    b = torch.stack([b_piece.view(raw.data) for _, b_piece in rows]).to(torch_dtype(COMPUTE_DTYPE))
    return a, b * raw.scales[task].view(-1, 1, 1)


def _refuse_non_finite(adapters: list[Adapter], group: list[ModuleSpec], raw: _RawGroup) -> None:
    """Name the first adapter file and module whose (scaled) factors hold NaN or infinite values."""
    for task, adapter in enumerate(adapters):
        if raw.pieces[task] is None:
            continue
        a, b = _task_factors(raw, task)
        bad = ~(torch.isfinite(a).flatten(1).all(dim=1) & torch.isfinite(b).flatten(1).all(dim=1))
        if bool(bad.any()):
            name = group[int(bad.nonzero()[0, 0])].name
            raise InputError(f"{adapter.weights_path}: module {name} has NaN or infinite values")


def _load_group(adapters: list[Adapter], group: list[ModuleSpec], raw: _RawGroup) -> FactorGroup:
    """The group's concatenated scaled factors on the device, from its raw stored factors, each converted once
    into its place in one float32 buffer per side (no stacked or concatenated copy of the group): A a task at a
    time (its rows of every module), B as `B_WRITERS` says for the device."""
    present = [task for task, rows in enumerate(raw.pieces) if rows is not None]
    pieces = [raw.pieces[task] or [] for task in present]
    ranks = [rows[0][0].shape[0] for rows in pieces]
    (a_first, b_first), dtype, device = pieces[0][0], torch_dtype(COMPUTE_DTYPE), raw.data.device
    a_cat = torch.empty(len(group), sum(ranks), a_first.shape[1], dtype=dtype, device=device)
    b_cat = torch.empty(len(group), b_first.shape[0], sum(ranks), dtype=dtype, device=device)
    for rows, columns in zip(pieces, column_slices(ranks), strict=True):
        torch.stack([a_piece.view(raw.data) for a_piece, _ in rows], out=a_cat[:, columns])
    B_WRITERS["cpu" if device.type == "cpu" else "accelerator"](b_cat, raw, present)
    if not _finite(b_cat, a_cat):
        _refuse_non_finite(adapters, group, raw)
    return FactorGroup(b_cat=b_cat, a_cat=a_cat, ranks=list(group[0].ranks))


def _scaled_b_by_module(b_cat: torch.Tensor, raw: _RawGroup, present: list[int]) -> None:
    """Fill b_cat (G, out, R) a module at a time: every task's scaled columns side by side (G·T small copies, each
    a contiguous write: on the CPU a strided write of a few columns per row converts several times slower)."""
    for index in range(b_cat.shape[0]):
        scaled = [
            (raw.pieces[task] or [])[index][1].view(raw.data).to(b_cat.dtype, copy=True).mul_(raw.scales[task, index])
            for task in present
        ]
        torch.cat(scaled, dim=-1, out=b_cat[index])


def _scaled_b_by_task(b_cat: torch.Tensor, raw: _RawGroup, present: list[int]) -> None:
    """Fill b_cat (G, out, R) a task at a time: its columns of every module at once (3 kernel launches a task
    instead of 2 a module and task, which on a GPU cost more than the copies)."""
    ranks = [(raw.pieces[task] or [])[0][1].shape[1] for task in present]
    for task, columns in zip(present, column_slices(ranks), strict=True):
        stored = torch.stack([b_piece.view(raw.data) for _, b_piece in raw.pieces[task] or []])
        b_cat[:, :, columns].copy_(stored).mul_(raw.scales[task].view(-1, 1, 1))


# How a device fills a group's scaled B factors: the same values (stored value in float32 times its scale, the
# same bits), in the order that device converts fastest.
B_WRITERS = {"cpu": _scaled_b_by_module, "accelerator": _scaled_b_by_task}


def read_groups(
    adapters: list[Adapter], waves: list[list[list[ModuleSpec]]], device: torch.device
) -> Iterator[tuple[list[ModuleSpec], FactorGroup]]:
    """Every group's specs and concatenated scaled factors on `device`, read as the merge reads them (NaN or
    infinite factors refused, naming the file and module)."""
    with WaveStream(adapters, waves, device) as stream:
        for wave, raws in zip(waves, stream, strict=True):
            for group, raw in zip(wave, raws, strict=True):
                with single_threaded(device):  # as merge_modules loads them
                    factors = _load_group(adapters, group, raw)
                yield group, factors


def _written_rank(
    method: Method, settings: MergeSettings, group: list[ModuleSpec], written_ranks: dict[str, int] | None
) -> int:
    """The rank a group is written at: as planned, else the method's output rank for the requested one."""
    if written_ranks is not None:
        return written_ranks[group[0].name]
    return method.output_rank(settings.rank, group[0].ranks)


def _group_label(group: list[ModuleSpec]) -> str:
    """The group's first module, and how many more, for error messages."""
    return group[0].name + (f" (and {len(group) - 1} more)" if len(group) > 1 else "")


def _to_output(result: MergeResult, group: list[ModuleSpec], dtype: torch.dtype) -> MergeResult:
    """The group's result on the host: its merged factors cast once to the output dtype (refused if not finite, in
    the compute dtype or once cast), and the report's figures with them, a copy per figure rather than per module."""
    lora_a, lora_b = result.lora_a, result.lora_b
    if not _finite(lora_a, lora_b):
        raise InputError(
            f"{_group_label(group)}: the merged factors overflow float32 (input values times --weights too large)"
        )
    lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
    if not _finite(lora_a, lora_b):
        dtype_name = str(dtype).removeprefix("torch.")
        raise UsageError(f"{_group_label(group)}: the merged factors overflow {dtype_name}; use --dtype float32")
    tensors = {f.name: getattr(result, f.name) for f in fields(result)} | {"lora_a": lora_a, "lora_b": lora_b}
    on_host: dict[str, Any] = {name: None if value is None else value.cpu() for name, value in tensors.items()}
    return MergeResult(**on_host)


def _merge_wave(
    method: Method, factors: list[FactorGroup], settings: list[MergeSettings], wave: list[list[ModuleSpec]]
) -> list[MergeResult]:
    """Run the method on a wave of groups; inputs its rule cannot merge, and a linear-algebra breakdown (extreme
    values), become a clear usage error."""
    try:
        return method.merge_all(factors, settings)
    except RuleError as exc:
        raise UsageError(str(exc)) from exc
    except torch.linalg.LinAlgError as exc:
        raise UsageError(
            f"{_group_label([spec for group in wave for spec in group])}: the merge broke down numerically "
            f"({str(exc).splitlines()[0]}); check --weights and the inputs for extreme values"
        ) from exc


def _optional(values: torch.Tensor | None, index: int, kind: Callable[[float], Number]) -> Number | None:
    return None if values is None else kind(values[index].item())


def _module_stats(spec: ModuleSpec, result: MergeResult, index: int, written_rank: int, seconds: float) -> ModuleStats:
    """The report's figures for module `index` of a merged group."""
    return ModuleStats(
        name=spec.name,
        out_features=spec.out_features,
        in_features=spec.in_features,
        ranks=spec.ranks,
        written_rank=written_rank,
        kept_energy=[float(x) for x in result.kept_energy[index].tolist()],
        relative_error=_optional(result.relative_error, index, float),
        sweeps=_optional(result.sweeps, index, int),
        frame_energy=_optional(result.frame_energy, index, float),
        truncation_loss=_optional(result.truncation_loss, index, float),
        full_rank_loss=_optional(result.full_rank_loss, index, float),
        seconds=seconds,
    )


def merge_modules(
    adapters: list[Adapter],
    waves: list[list[list[ModuleSpec]]],
    method: Method,
    settings: MergeSettings,
    device: torch.device,
    output_dtype: torch.dtype,
    written_ranks: dict[str, int] | None = None,
) -> MergeOutput:
    """Merge every wave of groups on `device`, keeping only the (small) results on the host; tells
    `progress` the bytes read and the modules merged. Each module is written at `written_ranks[name]` (by default
    the method's output rank for the requested one)."""
    tensors: dict[str, torch.Tensor] = {}
    stats: list[ModuleStats] = []
    settings = replace(settings, weights=settings.weights.to(device))
    done, total = 0, sum(len(group) for wave in waves for group in wave)
    with WaveStream(adapters, waves, device) as stream:
        for number, (wave, raws) in enumerate(zip(waves, stream, strict=True), start=1):
            progress.emit("merging", done, total, "modules", f"wave {number} of {len(waves)}")
            started = time.perf_counter()
            each = [replace(settings, rank=_written_rank(method, settings, group, written_ranks)) for group in wave]
            # One thread: bit-identical whatever the grouping and thread count; and the copies of the loading and
            # output steps, thousands of small ones, never wait on other threads (40× slower on a busy host).
            with single_threaded(device):
                factors = [_load_group(adapters, group, raw) for group, raw in zip(wave, raws, strict=True)]
                merged = _merge_wave(method, factors, each, wave)
                results = [_to_output(result, group, output_dtype) for result, group in zip(merged, wave, strict=True)]
            seconds = (time.perf_counter() - started) / sum(len(group) for group in wave)
            for group, result in zip(wave, results, strict=True):
                for index, spec in enumerate(group):
                    a_key, b_key = output_keys(adapters, spec.name)
                    tensors[a_key] = result.lora_a[index].contiguous()
                    tensors[b_key] = result.lora_b[index].contiguous()
                    stats.append(_module_stats(spec, result, index, result.lora_a.shape[1], seconds))
                done += len(group)
            progress.emit("merging", done, total, "modules", f"wave {number} of {len(waves)} merged")
    stats.sort(key=lambda s: s.name)
    return MergeOutput(tensors=tensors, stats=stats)
