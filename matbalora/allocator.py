"""Keep large CPU tensors on the heap instead of fresh ``mmap`` pages (glibc only).

glibc serves every allocation above ``M_MMAP_THRESHOLD`` (128 KiB, adapting up to 32 MiB) with a
fresh ``mmap`` and returns it with ``munmap`` when freed. A forward pass over thousands of bonds
allocates and frees tensors of tens to hundreds of MB, so every pass page-faults all of them in
again (the kernel zeroes each 4 KiB page). On 32 mp_gap crystals we measured 1.3-3.0 million minor
page faults per 16-sample prediction and 1.5-2.2x its time (fixed 64-crystal batches); with the row
budget of :func:`matbalora.model.plan_passes`, 16 samples of 64 crystals took 1.25x longer untuned.
Raising the mmap and trim thresholds lets freed blocks be reused: the process keeps up to its peak
heap instead of returning it to the OS after each pass.

This changes a process-wide setting, so the library never calls it on import: the ``matbalora``
command line, the distributed screening workers and the benchmark call it; a Python user may.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
#: Allocations up to this size come from the heap (reused) instead of mmap.
MMAP_THRESHOLD = 1 << 30  # 1 GiB
#: Free heap above this size is returned to the OS.
TRIM_THRESHOLD = (1 << 31) - 1

_tuned = False


def tune_cpu_allocator() -> bool:
    """Raise glibc's mmap/trim thresholds once per process; False where glibc is not in use."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        log.info("no glibc mallopt; allocator left as it is")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _tuned = ok
    log.info("glibc malloc thresholds %s", "raised" if ok else "unchanged (mallopt refused)")
    return ok
