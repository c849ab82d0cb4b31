"""The device a merge runs on: a --device value checked, and `auto` resolved, without loading torch on a machine
that has no GPU driver (so that `ctm merge --dry-run` starts at once there)."""

from __future__ import annotations

import os
import re
import sys

import torch

from ctm_cli.cuda_driver import open_context_in_background
from ctm_cli.errors import UsageError

_DEVICE_NAME = re.compile(r"(cpu|cuda)(:\d+)?")
# Present on Linux wherever a GPU driver torch could use is loaded: NVIDIA's, AMD's (ROCm).
_GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def resolve_device(name: str) -> torch.device:
    """The torch device of a --device value (see `check_device`)."""
    return torch.device(check_device(name))


def check_device(name: str) -> str:
    """`auto` picks CUDA when present; otherwise the named device, refused unless it is the CPU or a CUDA
    device this machine has. Returns the device's name; asks torch (which loads it) only where a GPU driver is."""
    if name == "auto":
        return "cuda" if _cuda_available() else "cpu"
    if _DEVICE_NAME.fullmatch(name) is None:
        raise UsageError(f"--device {name!r} is not one of: auto, cpu, cuda, cuda:N")
    if name.startswith("cuda"):
        if not _cuda_available():
            raise UsageError(f"--device {name}: no CUDA device is available here (use --device cpu or auto)")
        count, index = torch.cuda.device_count(), torch.device(name).index
        if index is not None and index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return name


def open_context_early(name: str) -> None:
    """For a merge about to run on `name` (auto, cuda or cuda:N) where a GPU driver is loaded: start making that
    device's CUDA context in the background (cuda_driver), before torch is imported. Other names are left for
    `check_device` to judge."""
    if name == "cpu" or not _gpu_driver_loaded() or not (name == "auto" or _DEVICE_NAME.fullmatch(name)):
        return
    open_context_in_background(int(name.partition(":")[2] or 0))


def _gpu_driver_loaded() -> bool:
    """False on a Linux machine without an NVIDIA or AMD driver (known without loading torch); True elsewhere."""
    return sys.platform != "linux" or any(os.path.exists(path) for path in _GPU_DRIVER_PATHS)


def _cuda_available() -> bool:
    """Whether torch sees a CUDA (or ROCm) device; asks torch only where a GPU driver is loaded."""
    return _gpu_driver_loaded() and torch.cuda.is_available()
