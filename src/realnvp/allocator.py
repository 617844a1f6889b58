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
- ``"system"``: glibc's settings left as they are: its defaults in a fresh process. After
  ``"keep"`` or ``"release"`` in the same process they cannot be restored (an explicit mmap
  threshold also turns off glibc's sliding one for good).
- ``"jemalloc"``: not glibc's malloc at all but jemalloc, preloaded when the process starts
  (``LD_PRELOAD``) with its page decay off (``MALLOC_CONF``, :data:`JEMALLOC_CONF`): it reuses
  freed blocks without glibc's fragmentation, so the memory-saving modes' peak is near the live
  tensors (about 1090 MiB) at ``"keep"``'s speed. A running process cannot switch allocators:
  ``realnvp train --malloc jemalloc`` restarts itself with jemalloc preloaded
  (:func:`restart_with_jemalloc`); the Python API only checks that it is.

With another allocator preloaded (jemalloc, tcmalloc) glibc's settings do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import sys
import warnings
from pathlib import Path

# mallopt(3) parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2, which is 32 MiB on 64-bit systems
MAX_MMAP_THRESHOLD = 32 * 2**20
# glibc's initial mmap threshold; setting it explicitly also stops glibc from raising it after
# the first large free, which is what lets big blocks move into the fragmenting heap
RELEASE_THRESHOLD = 128 * 2**10

MALLOC_POLICIES = ("keep", "release", "system", "jemalloc")

# Debian's libjemalloc2 and other distributions' usual places
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
                  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
# jemalloc's default decay hands freed pages back to the kernel within seconds; a training step
# frees and reallocates gigabytes, so each reuse page-faults and is zeroed again (measured: the
# invertible mode at 1.9 instead of 3.9 img/s). Without decay its footprint stays at its peak.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# set in the environment of a process restarted with jemalloc, so that a failed preload is
# reported instead of restarting again
RESTARTED_MARKER = "REALNVP_RESTARTED_WITH_JEMALLOC"


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


def find_jemalloc() -> str | None:
    """The path of libjemalloc.so.2 on this machine, or None."""
    return next((p for p in JEMALLOC_PATHS if Path(p).exists()), None)


def loaded_allocator() -> str:
    """The malloc this process really uses: "jemalloc" if it is mapped into the process,
    "system" if not, "unknown" without /proc (a failed LD_PRELOAD only prints a warning, so
    the environment variable alone does not tell)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return "jemalloc" if "libjemalloc" in maps else "system"


def jemalloc_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with jemalloc preloaded and, unless ``MALLOC_CONF``
    is already set, its page decay off. Raises ValueError if jemalloc is not installed."""
    path = find_jemalloc()
    if path is None:
        raise ValueError("the jemalloc malloc policy needs libjemalloc.so.2 (Debian/Ubuntu: "
                         f"apt install libjemalloc2) in one of {', '.join(JEMALLOC_PATHS)}")
    env = dict(os.environ if env is None else env)
    env["LD_PRELOAD"] = " ".join(filter(None, [path, env.get("LD_PRELOAD")]))
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def restart_with_jemalloc(argv: list[str], program: list[str] | None = None) -> None:
    """Replace this process by ``python PROGRAM ARGV`` (``PROGRAM``: ``-m realnvp`` unless
    given, e.g. a script's path) with jemalloc preloaded (same process id, so torchrun keeps
    track of it). Call before any work; returns only if jemalloc is loaded already. Raises
    ValueError if jemalloc is missing or failed to load."""
    if loaded_allocator() == "jemalloc":
        _restore_environment()
        return
    if os.environ.get(RESTARTED_MARKER):
        raise ValueError(f"restarted with LD_PRELOAD={os.environ.get('LD_PRELOAD')!r}, but "
                         "jemalloc is not loaded (see the loader's warning above)")
    before = {k: os.environ.get(k) for k in ("LD_PRELOAD", "MALLOC_CONF")}
    env = {**jemalloc_environment(), RESTARTED_MARKER: json.dumps(before)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *(program or ["-m", "realnvp"]), *argv], env)


_applied: str | None = None  # the glibc policy this process last applied ("keep", "release")


def _restore_environment() -> None:
    """In the restarted process, once jemalloc is loaded: LD_PRELOAD and MALLOC_CONF as they
    were before the restart, so that the processes this one starts (torch.compile's workers,
    a compiler) do not inherit jemalloc with its page decay off."""
    marker = os.environ.pop(RESTARTED_MARKER, None)
    try:
        before = json.loads(marker) if marker else {}
    except json.JSONDecodeError:  # an older marker ("1"): nothing recorded
        before = {}
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def set_malloc_policy(policy: str) -> bool:
    """Apply one of :data:`MALLOC_POLICIES` ("keep", "release", "system", "jemalloc"; see the
    module's docstring). Returns whether glibc's settings changed ("system" and "jemalloc"
    change nothing: False). Raises ValueError for an unknown policy, and for "jemalloc" when
    jemalloc was not preloaded into this process."""
    if policy not in MALLOC_POLICIES:
        raise ValueError(f"malloc policy must be one of {', '.join(MALLOC_POLICIES)}, "
                         f"got {policy!r}")
    global _applied
    if policy in ("keep", "release"):
        changed = keep_freed_memory() if policy == "keep" else release_freed_memory()
        _applied = policy if changed else _applied
        return changed
    if policy == "system" and _applied is not None:
        warnings.warn(f"malloc policy 'system': glibc's defaults cannot be restored in this "
                      f"process, which keeps the {_applied!r} settings applied earlier",
                      stacklevel=2)
    if policy == "jemalloc" and loaded_allocator() != "jemalloc":
        raise ValueError("the jemalloc malloc policy needs jemalloc preloaded when the process "
                         f"starts: LD_PRELOAD={find_jemalloc() or 'libjemalloc.so.2'} "
                         f"MALLOC_CONF={JEMALLOC_CONF} (`realnvp train --malloc jemalloc` "
                         "restarts itself that way)")
    return False
