"""The merge's device: its CUDA context started through the driver before torch is imported, for merges only."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
import torch
from helpers import run_ctm

from ctm_cli import cuda_driver, devices

DEVICE = torch.device(os.environ.get("CTM_TEST_DEVICE", "cpu"))


def _driver_present() -> bool:
    try:
        ctypes.CDLL(cuda_driver.DRIVER_LIBRARY)
    except OSError:
        return False
    return True


@pytest.fixture
def opened(monkeypatch) -> list[int]:
    """The device indexes whose context `open_context_early` starts, on a machine made to look as if it had a GPU
    driver (nothing is started for real)."""
    started: list[int] = []
    monkeypatch.setattr(devices, "_gpu_driver_loaded", lambda: True)
    monkeypatch.setattr(devices, "open_context_in_background", started.append)
    return started


@pytest.mark.parametrize(
    ("name", "indexes"), [("auto", [0]), ("cuda", [0]), ("cuda:3", [3]), ("cpu", []), ("gpu", []), ("cuda:x", [])]
)
def test_the_early_context_is_the_named_devices(opened: list[int], name: str, indexes: list[int]) -> None:
    """auto and cuda start device 0's context, cuda:N device N's; the CPU and names --device refuses start none."""
    devices.open_context_early(name)
    assert opened == indexes


def test_no_context_is_started_without_a_gpu_driver(monkeypatch) -> None:
    """Where no GPU driver is loaded, nothing is started (and torch is not asked)."""
    started: list[int] = []
    monkeypatch.setattr(devices, "_gpu_driver_loaded", lambda: False)
    monkeypatch.setattr(devices, "open_context_in_background", started.append)
    devices.open_context_early("auto")
    assert started == []


def test_a_merge_starts_the_context_and_a_dry_run_does_not(opened: list[int], make_adapter, tmp_path: Path) -> None:
    """`ctm merge` starts the context of the device it will merge on before its checks; `--dry-run` merges
    nothing and starts none."""
    a, b = make_adapter(r=4, seed=1), make_adapter(r=4, seed=2)
    planned = run_ctm("merge", a, b, "-o", tmp_path / "plan", "--rank", "4", "--dry-run", "--quiet", "--device", "cpu")
    assert planned.exit_code == 0 and opened == []
    merged = run_ctm("merge", a, b, "-o", tmp_path / "merged", "--rank", "4", "--quiet", "--device", "cuda:1")
    assert opened == [1] and merged.exit_code != 0  # no second GPU here: refused by the checks after the start


@pytest.mark.skipif(DEVICE.type == "cuda" or _driver_present(), reason="this machine has a CUDA driver")
def test_without_the_driver_library_nothing_is_retained() -> None:
    """No libcuda: the driver step says no context, and raises nothing."""
    assert cuda_driver.retain_primary_context(0) is False


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device (CTM_TEST_DEVICE=cuda)")
def test_the_retained_context_is_the_one_torch_uses() -> None:
    """The driver's primary context is retained, and torch computes on that device after it."""
    index = DEVICE.index or 0
    assert cuda_driver.retain_primary_context(index)
    assert torch.ones(4, device=DEVICE).sum().item() == 4.0
