"""ctm's safetensors writer against the library's: the same bytes (the metadata sorted), read back alike."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save

from ctm_cli.safetensors_format import write_file

DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn, torch.int16, torch.uint16,
    torch.float16, torch.bfloat16, torch.int32, torch.uint32, torch.float32, torch.float64, torch.int64, torch.uint64,
]  # fmt: skip


def library_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The library's file with its metadata map sorted and the header padded again (what ctm promises)."""
    data = save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, generator=generator) * 50
    return values.to(dtype) if dtype.is_floating_point or dtype == torch.bool else values.abs().to(dtype)


@pytest.mark.parametrize("seed", range(4))
def test_same_bytes_as_the_library_for_every_dtype(tmp_path, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for index in range(12):
        dtype = DTYPES[int(torch.randint(len(DTYPES), (1,), generator=generator))]
        shape = tuple(int(x) for x in torch.randint(0, 5, (int(torch.randint(1, 4, (1,), generator=generator)),),
                                                      generator=generator))
        tensors[f"layer.{index % 3}.w{index}"] = random_tensor(dtype, shape, generator)
    metadata = {"zeta": "1", "alpha": "é ünïcode", "format": "pt", "ctm_settings": json.dumps({"a": [1, 2]})}
    write_file(tmp_path / "w.safetensors", tensors, metadata)
    assert (tmp_path / "w.safetensors").read_bytes() == library_bytes(tensors, metadata)


def test_empty_metadata_and_non_contiguous_tensors(tmp_path):
    matrix = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"b": matrix.T, "a": matrix[:, 1::2], "c": torch.zeros(0, 3, dtype=torch.bfloat16)}
    write_file(tmp_path / "w.safetensors", tensors, {})
    expected = {key: value.contiguous() for key, value in tensors.items()}
    assert (tmp_path / "w.safetensors").read_bytes() == library_bytes(expected, {})
    loaded = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[key], expected[key]) for key in tensors)
