"""The process's CPU memory allocator: what glibc's ``malloc`` does with the memory a step frees.

A training step of an image model allocates and frees gigabytes of activations. glibc's
``malloc`` by default hands a freed block back to the kernel when it is larger than its mmap
threshold (at most 32 MiB), and trims the top of its heap whenever more than its trim threshold
is free there, which happens at the end of every backward pass. Every such page is then
page-faulted in and zeroed by the kernel again at its next use, inside the convolutions and
batch norms that touch it first. For the ``cifar10`` preset at batch 64 on the project's 2-core
CPU that was about 180,000–230,000 page faults and 1.2–1.3 s of kernel time per 13 s step
(docs/benchmarks.md). Two policies, both set with ``mallopt(3)`` at run time:

- ``"keep"`` (:func:`keep_freed_memory`, the trainer's default): never trim the heap and serve
  every block up to 32 MiB from it, so the heap stays at its high-water mark and is reused.
  The resident memory no longer shrinks between steps (it stays at the peak, which a training
  process reaches at every step anyway), but the heap fragments: the peak is a few hundred MiB
  above the live tensors and varies between identical runs.
- ``"release"`` (:func:`release_freed_memory`): the opposite. Every block above 128 KiB gets a
  mapping of its own, unmapped the moment it is freed, so the peak is the live tensors' and
  nothing else (the memory-saving modes of the ``cifar10`` preset: 1017–1020 MiB instead of
  1467–1899), paid for with page faults at every step (there: 27 % slower).
- ``"system"``: glibc's defaults, left as they are.

With another allocator preloaded (jemalloc, tcmalloc) glibc's settings do nothing; configure
that allocator instead.
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
# glibc's initial mmap threshold; setting it explicitly also stops glibc from raising it after
# the first large free, which is what lets big blocks move into the fragmenting heap
RELEASE_THRESHOLD = 128 * 2**10

MALLOC_POLICIES = ("keep", "release", "system")


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


def _mallopt(trim_threshold: int, mmap_threshold: int) -> bool:
    """Both thresholds set; True if glibc took both, False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    trim = libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
    mmap = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    return bool(trim and mmap)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse: never trim the heap, and serve every
    block up to 32 MiB from the heap instead of a fresh mapping.

    A process-wide setting: call it once, before the work that allocates (the trainer does,
    unless ``TrainConfig.malloc`` says otherwise). Returns True if glibc took both settings,
    False where the C library is not glibc (macOS, Windows, musl), where it does nothing.
    """
    # mallopt takes an int; glibc stores the trim threshold as a size_t, so -1 means "never"
    return _mallopt(-1, MAX_MMAP_THRESHOLD)


def release_freed_memory() -> bool:
    """Make glibc's malloc give every block above 128 KiB back to the kernel when it is freed:
    the lowest peak memory, at the price of page faults (and zeroed pages) at every step.

    Process-wide, like :func:`keep_freed_memory`; the same return value.
    """
    return _mallopt(RELEASE_THRESHOLD, RELEASE_THRESHOLD)


def set_malloc_policy(policy: str) -> bool:
    """Apply one of :data:`MALLOC_POLICIES` ("keep", "release", "system"; see the module's
    docstring). Returns whether glibc's settings changed ("system" changes nothing: False)."""
    if policy not in MALLOC_POLICIES:
        raise ValueError(f"malloc policy must be one of {', '.join(MALLOC_POLICIES)}, "
                         f"got {policy!r}")
    if policy == "keep":
        return keep_freed_memory()
    if policy == "release":
        return release_freed_memory()
    return False
