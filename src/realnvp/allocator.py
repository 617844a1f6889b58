"""The process's CPU memory allocator: keep freed memory for reuse instead of returning it.

A training step of an image model allocates and frees gigabytes of activations. glibc's
``malloc`` by default hands a freed block back to the kernel when it is larger than its mmap
threshold (at most 32 MiB), and trims the top of its heap whenever more than its trim threshold
is free there, which happens at the end of every backward pass. Every such page is then
page-faulted in and zeroed by the kernel again at its next use, inside the convolutions and
batch norms that touch it first. For the ``cifar10`` preset at batch 64 on the project's 2-core
CPU that was about 180,000–230,000 page faults and 1.2–1.3 s of kernel time per 13 s step
(docs/benchmarks.md). :func:`keep_freed_memory` turns both off, as ``mallopt(3)`` allows at run
time, so the heap stays at its high-water mark and is reused.

What it costs: the resident memory no longer shrinks between steps (it stays at the peak, which
a training process reaches at every step anyway). Blocks above 32 MiB, glibc's largest mmap
threshold, are still mapped and unmapped each time. With another allocator preloaded (jemalloc,
tcmalloc) glibc's settings do nothing; configure that allocator instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# mallopt(3) parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2, which is 32 MiB on 64-bit systems
MAX_MMAP_THRESHOLD = 32 * 2**20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library of this process if it is glibc (the only one whose mallopt this module
    knows), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (musl and others lack it)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse: never trim the heap, and serve every
    block up to 32 MiB from the heap instead of a fresh mapping.

    A process-wide setting: call it once, before the work that allocates (the trainer does,
    unless ``TrainConfig.keep_freed_memory`` is off). Returns True if glibc took both settings,
    False where the C library is not glibc (macOS, Windows, musl), where it does nothing.
    """
    libc = _glibc()
    if libc is None:
        return False
    # mallopt takes an int; glibc stores the trim threshold as a size_t, so -1 means "never"
    trim = libc.mallopt(M_TRIM_THRESHOLD, -1)
    mmap = libc.mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)
    return bool(trim and mmap)
