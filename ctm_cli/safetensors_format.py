"""The safetensors format, in one place: its dtype names, reading a file (lazily through the library, which checks
it, or with plain reads at the offsets its header gives), and writing one (bytes, and their size beforehand).

A file is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape and byte offsets in the
data; plus `__metadata__`, a map of strings) and the data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from ctm_cli.errors import InputError, first_line, unreadable

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_LFS_MAGIC = b"version https://git-lfs"


class SafetensorsFile:
    """A safetensors file checked by the library when opened; a tensor is read (memory-mapped) only when asked."""

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
            self._file = _open(path)
            self._keys = list(self._file.keys())
            self._slices = {key: self._file.get_slice(key) for key in self._keys}
        except Exception as exc:
            raise InputError(f"{path}: not a readable safetensors file ({first_line(str(exc))})") from exc
        self._path = path

    def names(self) -> list[str]:
        """The keys of the stored tensors."""
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        """A stored tensor's shape, without reading it."""
        return tuple(self._slices[key].get_shape())

    def dtype(self, key: str) -> torch.dtype | None:
        """A stored tensor's dtype, or None for one ctm does not read (integers, float8...)."""
        return DTYPES.get(self._slices[key].get_dtype())

    def metadata(self) -> dict[str, str]:
        """The file's `__metadata__` map (empty when it has none)."""
        return dict(self._file.metadata() or {})

    def get(self, key: str) -> torch.Tensor:
        """A stored tensor, read now."""
        try:
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
        return DTYPES[entry["dtype"]], tuple(entry["shape"])

    def read_into(self, key: str, target: torch.Tensor) -> None:
        """Read the tensor's bytes into `target` (a uint8 host tensor of exactly its size)."""
        begin, end = self._entries[key]["data_offsets"]
        view = memoryview(target.numpy())  # type: ignore[arg-type]  # a NumPy array is a buffer
        self._handle.seek(self._start + begin)
        done = 0
        while done < end - begin:
            count = self._handle.readinto(view[done:])
            if not count:
                raise InputError(f"{self.path}: ends inside tensor {key} (truncated file?)")
            done += count

    def close(self) -> None:
        """Close the file."""
        self._handle.close()


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The file's bytes, with the metadata in sorted order, so equal inputs give byte-identical files (the
    library writes the metadata map in an order that changes from call to call)."""
    data = save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


def encoded_size(shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype, metadata_bytes: int) -> int:
    """Size of a file with these tensors (in key order, as `encode` writes them), given `metadata_bytes` for
    the metadata: the 8-byte length, the JSON header and the data."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for key in sorted(shapes):
        size = shapes[key][0] * shapes[key][1] * itemsize
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
        offset += size
    return 8 + len(json.dumps(header, separators=(",", ":"))) + metadata_bytes + offset
