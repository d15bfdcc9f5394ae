"""Keep freed memory in the process (glibc), so a training step does not page-fault its
activations afresh every step.

By default glibc's ``malloc`` hands large freed blocks back to the operating system: blocks
above the mmap threshold are unmapped on ``free`` and the top of the heap is trimmed above the
trim threshold. A CPU training step allocates the same few-megabyte activation buffers every
step, so each step maps and first-touches them again. :func:`retain_freed_memory` raises both
thresholds with ``mallopt`` (the same settings as the environment variables
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, but applied from inside the process):
allocations up to ``mmap_threshold`` come from the heap, and freed heap memory stays with the
process for the next step. The cost is that the process keeps its peak heap until it exits.
Measured in docs/benchmarks.md ("Small images on a CPU: the dense-masked backend and the allocator").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["MMAP_THRESHOLD_MAX", "retain_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest accepted mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def _libc():
    """The C library as a ctypes handle when it is glibc (has ``mallopt``), else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def retain_freed_memory(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 2 ** 31 - 1,
                        libc=None) -> bool:
    """Ask glibc to serve blocks up to ``mmap_threshold`` bytes from the heap and to keep up to
    ``trim_threshold`` bytes of freed memory at the heap's top. Returns whether both settings
    were accepted (``False`` on other C libraries and platforms, where nothing changes).

    ``libc`` is the library to call (default: this process's C library); mallopt takes C ints, so
    both values must fit in 31 bits.
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not 0 <= int(value) < 2 ** 31:
            raise ValueError(f"{name} must be in [0, 2**31), got {value}")
    if int(mmap_threshold) > MMAP_THRESHOLD_MAX:
        raise ValueError(f"mmap_threshold above glibc's maximum {MMAP_THRESHOLD_MAX} is ignored by glibc, "
                         f"got {mmap_threshold}")
    lib = _libc() if libc is None else libc
    if lib is None:
        return False
    ok_mmap = lib.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(int(mmap_threshold)))
    ok_trim = lib.mallopt(ctypes.c_int(_M_TRIM_THRESHOLD), ctypes.c_int(int(trim_threshold)))
    return bool(ok_mmap) and bool(ok_trim)
