"""The device a merge runs on: a --device value checked, and `auto` resolved, without loading torch on a machine
that has no GPU driver (so that `ctm merge --dry-run` starts at once there)."""

from __future__ import annotations

import os
import re
import sys
import threading

import torch

from ctm_cli.errors import UsageError

_DEVICE_NAME = re.compile(r"(cpu|cuda)(:\d+)?")
# Present on Linux wherever a GPU driver torch could use is loaded: NVIDIA's, AMD's (ROCm).
_GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")
# Side of the matrices the warm-up solves on the device (cuSOLVER's batched range: ≤ 32), twice that on the host.
WARM_UP_SIZE = 16


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


def _cuda_available() -> bool:
    """Whether torch sees a CUDA (or ROCm) device. On Linux, a machine without an NVIDIA or AMD driver has none,
    which is known without loading torch."""
    if sys.platform == "linux" and not any(os.path.exists(path) for path in _GPU_DRIVER_PATHS):
        return False
    return torch.cuda.is_available()


def warm_up_in_background(device: torch.device) -> None:
    """On a GPU, load in a daemon thread, while the merge reads its inputs, what its first calls would otherwise wait
    for: the CUDA libraries' handles and kernels (cuBLAS, cuSOLVER's batched solvers) and the host's solving
    threads (small_linalg). Nothing on the CPU."""
    if device.type == "cuda":
        threading.Thread(target=_warm_up, args=(device,), name="ctm-warm-up", daemon=True).start()


def _warm_up(device: torch.device) -> None:
    """Tiny versions of the merge's first calls; their results are dropped."""
    from ctm_cli import small_linalg  # imported by the merge anyway

    try:
        with torch.cuda.device(device):
            for dtype in (torch.float32, torch.float64):
                matrix = torch.eye(WARM_UP_SIZE, dtype=dtype, device=device).expand(2, -1, -1).contiguous()
                torch.linalg.eigh(matrix @ matrix)
                torch.linalg.svd(matrix, full_matrices=False)
            cores = small_linalg.usable_cores()
            on_host = torch.eye(2 * WARM_UP_SIZE, dtype=torch.float64).expand(cores, -1, -1).contiguous()
            small_linalg.solve_in_chunks(torch.linalg.eigh, on_host, cores)
            torch.cuda.synchronize(device)
    except Exception:  # a broken device fails the merge itself, which says why
        return
