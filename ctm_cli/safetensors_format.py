"""The safetensors format, in one place: its dtype names, reading a file (lazily through the library, which checks
it, or with plain reads at the offsets its header gives), and writing one (bytes, and their size beforehand).

A file is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape and byte offsets in the
data; plus `__metadata__`, a map of strings) and the data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ctm_cli.errors import InputError, first_line, unreadable

# Bytes per element of every safetensors dtype, and the float ones ctm reads, by their torch names (kept as names,
# not torch dtypes, so that reading a header never loads torch).
ITEM_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
FLOAT_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
FORMAT_NAMES = {name: code for code, name in FLOAT_NAMES.items()}
_LFS_MAGIC = b"version https://git-lfs"
HEADER_LIMIT = 100 * 1024**2  # the safetensors library refuses larger headers too


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a float dtype name (`float32`, `bfloat16`, ...)."""
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a torch dtype without its `torch.` prefix."""
    return str(dtype).removeprefix("torch.")


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The tensor entries of a safetensors file's header (dtype, shape, data_offsets by key), checked as the
    library checks them (a JSON object of known dtypes and integer shapes whose byte ranges tile the data exactly),
    and its `__metadata__` string map (empty when it has none)."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        size = os.fstat(handle.fileno()).st_size
        if length > min(HEADER_LIMIT, size - 8):
            raise ValueError(f"header length {length} exceeds the file or {HEADER_LIMIT} bytes")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deeply
            raise ValueError(f"invalid header: {first_line(str(exc))}") from exc
    if not isinstance(header, dict):
        raise ValueError("invalid header: not a JSON object")
    entries = {key: value for key, value in header.items() if key != "__metadata__"}
    ranges = {key: _offsets(key, entry) for key, entry in entries.items()}
    end = 0
    for key in sorted(ranges, key=ranges.__getitem__):
        (begin, stop), entry = ranges[key], entries[key]
        count = 1
        for dim in entry["shape"]:
            count *= dim
        if begin != end or stop - begin != count * ITEM_SIZES[entry["dtype"]]:
            raise ValueError(f"invalid header: tensor {key}'s data_offsets do not match its shape and neighbours")
        end = stop
    if end != size - 8 - length:
        raise ValueError(f"the data holds {size - 8 - length} bytes, the header describes {end}")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("invalid header: __metadata__ is not a map of strings")
    return entries, metadata


def _offsets(key: str, entry: Any) -> tuple[int, int]:
    """A header entry's byte range, after checking its fields' types."""
    fields = entry if isinstance(entry, dict) else {}
    shape, offsets = fields.get("shape"), fields.get("data_offsets")
    if (
        not isinstance(fields.get("dtype"), str)
        or fields["dtype"] not in ITEM_SIZES
        or not isinstance(shape, list)
        or not all(isinstance(dim, int) and dim >= 0 for dim in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(offset, int) and offset >= 0 for offset in offsets)
        or offsets[0] > offsets[1]
    ):
        raise ValueError(f"invalid header: bad entry for tensor {key}")
    return offsets[0], offsets[1]


class SafetensorsFile:
    """A safetensors file whose header is read and checked when opened (without torch); a tensor is read
    (memory-mapped, through the library) only when asked."""

    def __init__(self, path: Path):
        try:
            with path.open("rb") as handle:
                head = handle.read(len(_LFS_MAGIC))
        except OSError as exc:
            raise unreadable(path, exc) from exc
        if head == _LFS_MAGIC:
            raise InputError(f"{path}: is a Git LFS pointer, not weights (fetch it with `git lfs pull`)")
        if not head:
            raise InputError(f"{path}: empty file")
        try:
            self._entries, self._metadata = read_header(path)
        except OSError as exc:
            raise unreadable(path, exc) from exc
        except ValueError as exc:
            raise InputError(f"{path}: not a readable safetensors file ({first_line(str(exc))})") from exc
        self._path = path
        self._file: Any = None

    def names(self) -> list[str]:
        """The keys of the stored tensors."""
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        """A stored tensor's shape, without reading it."""
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> str | None:
        """A stored tensor's dtype name (`float32`...), or None for one ctm does not read (integers, float8...)."""
        return FLOAT_NAMES.get(self._entries[key]["dtype"])

    def metadata(self) -> dict[str, str]:
        """The file's `__metadata__` map (empty when it has none)."""
        return dict(self._metadata)

    def get(self, key: str) -> torch.Tensor:
        """A stored tensor, read now."""
        try:
            if self._file is None:
                self._file = _open(self._path)
            return self._file.get_tensor(key)
        except Exception as exc:
            raise InputError(f"{self._path}: tensor {key!r} cannot be read ({first_line(str(exc))})") from exc


def _open(path: Path) -> Any:
    """safetensors' lazy reader of a file. The library takes UTF-8 paths only, so a file whose path is not
    UTF-8 (bytes that Python holds as surrogates) is opened here and handed over as /dev/fd/N."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            return safe_open(f"/dev/fd/{descriptor}", framework="pt")
        finally:
            os.close(descriptor)
    return safe_open(str(path), framework="pt")


class PlainReads:
    """Tensors of a safetensors file read with plain reads at the offsets its header gives (never through a
    memory map, whose touched pages would count in this process's memory). Close it when done."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = path.open("rb", buffering=0)
        try:
            size = int.from_bytes(self._handle.read(8), "little")
            header = json.loads(self._handle.read(size))
        except (OSError, ValueError) as exc:
            self._handle.close()
            raise InputError(f"{path}: unreadable safetensors header ({exc})") from exc
        self._start = 8 + size
        self._entries = {key: value for key, value in header.items() if key != "__metadata__"}

    def describe(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of a stored tensor."""
        entry = self._entries[key]
        return torch_dtype(FLOAT_NAMES[entry["dtype"]]), tuple(entry["shape"])

    def data_range(self, key: str) -> tuple[int, int]:
        """The byte range of a stored tensor in the file's data (adjacent tensors can be read in one go)."""
        begin, end = self._entries[key]["data_offsets"]
        return begin, end

    def read_range(self, begin: int, target: torch.Tensor, what: str) -> None:
        """Read the data's bytes from `begin` into `target` (a uint8 host tensor of the range's size); `what` names
        them in the error of a truncated file."""
        view = memoryview(target.numpy())  # type: ignore[arg-type]  # a NumPy array is a buffer
        self._handle.seek(self._start + begin)
        done = 0
        while done < len(view):
            count = self._handle.readinto(view[done:])
            if not count:
                raise InputError(f"{self.path}: ends inside {what} (truncated file?)")
            done += count

    def close(self) -> None:
        """Close the file."""
        self._handle.close()


# The order in which the safetensors library lays tensors out: by decreasing dtype code in this list (so every
# tensor starts aligned to its item size), then by key.
_LAYOUT_ORDER = [
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
]  # fmt: skip
_TORCH_CODES = {
    **FORMAT_NAMES, "bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3",
    "int16": "I16", "uint16": "U16", "int32": "I32", "uint32": "U32", "int64": "I64", "uint64": "U64",
}  # fmt: skip


def _header_entries(tensors: list[tuple[str, str, list[int]]]) -> tuple[dict[str, Any], int]:
    """The header's entry of each tensor (key, dtype code, shape), their data laid out one after another in the
    given order, and the data's size in bytes."""
    entries: dict[str, Any] = {}
    offset = 0
    for key, code, shape in tensors:
        size = math.prod(shape) * ITEM_SIZES[code]
        entries[key] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return entries, offset


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file of host tensors, laid out as the library lays it out, with the metadata in sorted
    order (equal inputs give byte-identical files); each tensor's bytes go to the file as they are, with no copy
    of the whole file in memory."""
    codes = {key: _TORCH_CODES[dtype_name(tensor.dtype)] for key, tensor in tensors.items()}
    order = sorted(tensors, key=lambda key: (-_LAYOUT_ORDER.index(codes[key]), key))
    entries, _ = _header_entries([(key, codes[key], list(tensors[key].shape)) for key in order])
    header = {"__metadata__": dict(sorted(metadata.items())), **entries}
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for key in order:
            if tensors[key].numel():
                handle.write(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().data)


def encoded_size(shapes: Mapping[str, tuple[int, int]], dtype: str, metadata_bytes: int) -> int:
    """Size of a file with these tensors of dtype `dtype` (a name: `float32`...), in key order as `write_file` writes
    them, given `metadata_bytes` for the metadata: the 8-byte length, the JSON header and the data."""
    code = FORMAT_NAMES[dtype]
    entries, data_bytes = _header_entries([(key, code, list(shapes[key])) for key in sorted(shapes)])
    return 8 + len(json.dumps(entries, separators=(",", ":"))) + metadata_bytes + data_bytes
