"""Measured peak memory of a block of code: CUDA allocator stats, or the process's peak RSS on CPU.

CPU tensors are not seen by tracemalloc, so on CPU the peak is the resident set's high-water
mark (VmHWM), reset at the start of the block through /proc/self/clear_refs (Linux >= 4.0) after
returning freed heap pages to the OS (malloc_trim), so memory freed earlier does not hide a peak.
"""

from __future__ import annotations

import ctypes
import gc
from contextlib import contextmanager

import torch


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may keep freed pages, the delta is then low
        pass


class Peak:
    """`bytes`: peak memory above the level at the start of the block; `start`: that level."""

    bytes: int = 0
    start: int = 0


@contextmanager
def measure_peak(device: torch.device | str = "cpu"):
    """`with measure_peak(device) as p: ...` then `p.bytes` (CUDA: allocated; CPU: RSS)."""
    p = Peak()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        p.start = torch.cuda.memory_allocated(device)
        yield p
        torch.cuda.synchronize(device)
        p.bytes = torch.cuda.max_memory_allocated(device) - p.start
        return
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    p.start = _status_kib("VmRSS") * 1024
    yield p
    p.bytes = max(0, _status_kib("VmHWM") * 1024 - p.start)
