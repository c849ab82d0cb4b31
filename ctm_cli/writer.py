"""Atomic writing of the output PEFT folder: everything goes to a temporary sibling, then is renamed."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from ctm_cli.adapter import CONFIG_NAME, SAFETENSORS_NAME
from ctm_cli.errors import OutputError


def check_output(path: Path, force: bool) -> None:
    """Refuse, before any work, an output that is a file, exists without --force, or can't be written."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputError(f"{path}: exists and is not empty (use --force to replace it)")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: parent folder of the output does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: not writable")


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding with its metadata in sorted order, so equal inputs give byte-identical files
    (the library writes the metadata map in an order that changes from call to call)."""
    data = save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


def write_adapter(
    path: Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    metadata: dict[str, str],
    text_files: dict[str, str],
    force: bool,
) -> None:
    """Write the adapter and its companion files to `path` atomically; on failure nothing changes."""
    check_output(path, force)
    parent = path.absolute().parent
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.ctm-tmp-", dir=parent))
    except OSError as exc:
        raise OutputError(f"{parent}: cannot create a temporary folder ({exc.strerror})") from exc
    try:
        (staging / SAFETENSORS_NAME).write_bytes(safetensors_bytes(tensors, metadata))
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, text in text_files.items():
            (staging / name).write_text(text, encoding="utf-8")
        _replace(staging, path)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"{path}: writing failed ({exc.strerror or exc}); nothing was changed") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(staging: Path, path: Path) -> None:
    if not path.exists():
        staging.rename(path)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.ctm-old-", dir=path.absolute().parent))
    path.rename(retired / path.name)
    try:
        staging.rename(path)
    except BaseException:  # an OSError or an interrupt: put the old output back
        (retired / path.name).rename(path)
        retired.rmdir()
        raise
    shutil.rmtree(retired, ignore_errors=True)
