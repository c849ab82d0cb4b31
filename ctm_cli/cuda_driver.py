"""A GPU's context created through the CUDA driver itself (ctypes, no torch) in a background thread, so that it is
being made while torch is imported (a second or more) rather than after, at the merge's first GPU call. The driver
keeps one primary context per device, which torch's CUDA runtime then takes as it is."""

from __future__ import annotations

import ctypes
import threading

# The CUDA driver's library on Linux (torch's CUDA runtime loads the same one).
DRIVER_LIBRARY = "libcuda.so.1"
_started: set[int] = set()
_started_lock = threading.Lock()


def open_context_in_background(index: int) -> None:
    """Start making device `index`'s primary context in a daemon thread, once per process. Where the driver cannot
    be loaded or refuses, nothing happens: torch meets the same problem later and reports it."""
    with _started_lock:
        if index in _started:
            return
        _started.add(index)
    threading.Thread(target=retain_primary_context, args=(index,), name="ctm-cuda-context", daemon=True).start()


def retain_primary_context(index: int) -> bool:
    """Initialise the driver and retain device `index`'s primary context (kept for the life of the process, as
    torch keeps it). Whether the context is there; ctypes lets go of the GIL during each driver call."""
    try:
        driver = ctypes.CDLL(DRIVER_LIBRARY)
    except OSError:
        return False
    device, context = ctypes.c_int(), ctypes.c_void_p()
    if driver.cuInit(0) != 0 or driver.cuDeviceGet(ctypes.byref(device), index) != 0:
        return False
    return driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), device) == 0
