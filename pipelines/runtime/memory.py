"""Keep freed heap memory in the process for reuse (glibc), so a CPU batch does not fault its pages in again.

glibc hands freed memory back to the kernel once the free space at the top of the heap passes a threshold
(and serves big blocks by ``mmap``, unmapped again on ``free``). A CPU replica that samples batch after batch
of the same shapes then faults the same pages back in, zero-filled, every batch: ~3,000 minor page faults
per batch of 16 on the embedded default (`resource.getrusage`), and ~13 % more images/s served on 2 cores once
they are gone (docs/RESULTS.md, "Serving the student on Ray Serve"). The price: the process keeps its peak heap
(what it held at its largest batch) until it exits, which is what a long-lived replica holds anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(trim_threshold: int = 1 << 30, mmap_threshold: int = 1 << 28) -> bool:
    """Tell glibc's malloc to keep up to ``trim_threshold`` bytes of free heap and to serve blocks below
    ``mmap_threshold`` from the heap; for this process, from now on. False where it does not apply (not glibc)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)) and bool(libc.mallopt(_M_MMAP_THRESHOLD,
                                                                                          mmap_threshold))
