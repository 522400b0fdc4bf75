"""Keep freed CPU memory in the process for reuse while training (glibc `mallopt`).

PyTorch's CPU allocator caches nothing: every tensor is a `malloc`, and glibc's defaults hand large blocks
back to the OS on `free` (blocks above the mmap threshold, 128 KB to 32 MB, are unmapped; the heap top is trimmed
above twice that). A training step allocates and frees hundreds of MB of activations, so every step page-faults
them in again: on the demo recipe (SmolLM2, 30 steps, 2 cores) 3.3 M minor faults and 6.5 s of system time, against
0.5 M and 1.6 s with the settings below, and 750 -> 864 tokens/s (docs/performance.md). Intel's PyTorch CPU guide
gets the same effect by preloading jemalloc or tcmalloc; `mallopt` needs no preload. Written here because neither
torch nor accelerate sets it. The settings are process-wide and stay for the life of the process; memory freed
after training is reused by later allocations rather than returned to the OS.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GB come from the heap and are reused
TRIM_THRESHOLD = 1 << 30  # the heap top is returned to the OS only above 1 GB of free memory
TOP_PAD = 64 << 20  # the heap grows 64 MB at a time


@functools.lru_cache(maxsize=None)
def tune_malloc() -> str:
    """Apply the settings once per process (Linux with glibc only); returns what was done, for the run's stats."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not glibc: unchanged"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                      (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    except (OSError, AttributeError) as e:
        return f"glibc mallopt unavailable ({e}): unchanged"
    return ("glibc: blocks up to 1 GB reused in the heap, trimmed above 1 GB" if ok
            else "glibc refused a mallopt setting: partly unchanged")
