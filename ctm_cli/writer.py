"""Writing of the output PEFT folder, atomically (staging.py), after checks that refuse, before any work, an
output that would be unusable or would change an input."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from ctm_cli import staging
from ctm_cli.errors import OutputError
from ctm_cli.peft_layout import ADAPTER_FILES
from ctm_cli.safetensors_format import write_file

if TYPE_CHECKING:
    import torch


def check_output(path: Path, force: bool) -> None:
    """Refuse, before any work, an output that is a file, exists without --force, is a mount point (which no
    rename can replace), is read-only while --force would replace it, or whose parent can't be written."""
    location = staging.output_location(path)
    if os.path.exists(location) and not os.path.isdir(location):
        raise OutputError(f"{path}: exists and is not a folder")
    if os.path.isdir(location):
        if os.path.ismount(location):
            raise OutputError(f"{path}: is a mount point, which cannot be replaced; write into a folder inside it")
        if _holds_anything(path, location):
            if not force:
                raise OutputError(f"{path}: exists and is not empty (use --force to replace it)")
            if not os.access(location, os.W_OK | os.X_OK):
                raise OutputError(f"{path}: not writable, so --force cannot replace it")
    parent = location.parent
    if not os.path.isdir(parent):
        raise OutputError(f"{parent}: parent folder of the output does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: not writable")


def _holds_anything(path: Path, folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(entries)
    except OSError as exc:
        raise OutputError(f"{path}: cannot be read ({exc.strerror})") from exc


def check_apart(output: Path, inputs: Sequence[tuple[str, Path]]) -> None:
    """Refuse an output that is, contains or lies inside an input folder (`inputs`: each source and its folder),
    or contains a file an input reads (a Hub snapshot's files live in the cache's blobs/). Paths are compared as
    the file system sees them: symlinks followed, `..` resolved, and by device and inode."""
    target = output.resolve()
    around = _identities([target, *target.parents])  # the output and every folder above it
    for source, folder in inputs:
        files = [(folder / name).resolve() for name in ADAPTER_FILES if os.path.exists(folder / name)]
        place = _identity(folder.resolve())
        if place in around:
            relation = "is" if place == _identity(target) else "lies inside"
            raise OutputError(f"{output}: {relation} the input folder {source}; choose another output folder")
        inside = _identities([folder.resolve(), *folder.resolve().parents, *(p for f in files for p in f.parents)])
        if _identity(target) in inside:
            raise OutputError(f"{output}: contains the input {source}; choose another output folder")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _identities(paths: list[Path]) -> set[tuple[int, int]]:
    return {identity for identity in map(_identity, paths) if identity is not None}


# A file of the written adapter: text (its config), or the tensors and metadata of a safetensors file.
WeightFile: TypeAlias = "str | tuple[dict[str, torch.Tensor], dict[str, str]]"


def write_adapter(path: Path, weight_files: dict[str, WeightFile], text_files: dict[str, str], force: bool) -> None:
    """Write the adapter (`weight_files`: its config and weights, from ctm_cli/formats) and its companion files to
    `path` atomically (staging.py): on failure, or an interrupt before the final swap, nothing changes. What killed
    runs left beside it is cleaned up first, and the output checked again after (an output that a kill had left
    aside is back, and is replaced only with --force)."""
    target = staging.output_location(path)
    staging.remove_stale(target.parent)
    check_output(path, force)
    try:
        stage = staging.create(target)
    except OSError as exc:
        raise OutputError(f"{target.parent}: cannot create a temporary folder ({exc.strerror or exc})") from exc
    try:
        for name, content in weight_files.items():
            if isinstance(content, str):
                (stage.folder / name).write_text(content)
            else:
                write_file(stage.folder / name, *content)
        for name, text in text_files.items():
            (stage.folder / name).write_text(text, encoding="utf-8")
        staging.install(stage)
    except OSError as exc:
        staging.discard(stage)
        raise OutputError(f"{path}: writing failed ({exc.strerror or exc}); nothing was changed") from exc
    except BaseException:
        staging.discard(stage)  # after a swap that was interrupted, what is left there is the old output
        raise
