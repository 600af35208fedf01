"""Hold glibc's heap: a freed tensor's memory stays in the process for the next pass.

PyTorch's CPU allocator takes every tensor from malloc. With glibc's defaults a block past a
threshold that glibc adjusts as the process runs (up to 32 MiB) is a fresh `mmap`, and when
the memory free at the top of the heap passes twice that threshold it is given back to the
system (`brk` down), so a pass whose temporaries add up to more than a few MiB gives back
its pages when it ends and faults them in again on the next call. Which passes pay, and how
much, depends on what the process allocated and freed before: run alone, in three fresh
processes each, one thread, a per-token exit model (benchmarks/token_exits.py, L = 64, c =
0.125) took 3.5 / 4.1 / 4.1 ms with 520-1200 page faults a call, and 2.8-2.9 ms with none once
held; the static model of the same layer 9.6-10.8 ms (2200-2400 faults), 7.7 ms held
(docs/performance.md, "Page faults").

`hold_heap` sets glibc's thresholds once, for the whole process (`mallopt`): freed memory is
kept (trim threshold 1 GiB), blocks up to 1 GiB come from the heap, not from a fresh map, and
the heap grows by 64 MiB at a time. The price is that the process keeps the memory its
largest pass needed. The caching allocators PyTorch's CPU tuning guide recommends for serving
(jemalloc, tcmalloc) keep memory the same way; a deployment that cannot call this can set
the same through the environment before Python starts (`TUNABLES`). `dyngraph profile` and
`dyngraph eval` hold the heap for their process (`--glibc-heap` keeps the defaults) and the
profile records which it timed under (`heap_state`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP, _PAD = 1 << 30, 64 << 20
_FALLBACK_MMAP = 32 << 20  # glibc versions that refuse a threshold past HEAP_MAX_SIZE / 2

# The same settings for a process's environment (glibc 2.26 and later).
TUNABLES = (
    f"GLIBC_TUNABLES=glibc.malloc.trim_threshold={_KEEP}:glibc.malloc.mmap_threshold={_KEEP}"
    f":glibc.malloc.top_pad={_PAD}"
)

_state = {"held": False}


@functools.cache  # (find_library may run `ldconfig -p`: once per process)
def _libc():
    """glibc's handle, or None (musl's mallopt does nothing; macOS has none)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def holdable() -> bool:
    """Whether `hold_heap` can hold this process's heap (its C library is glibc)."""
    return _libc() is not None


def hold_heap() -> bool:
    """Keep freed memory in the process and serve big blocks from the heap (module doc), so
    that a pass does not fault its temporaries' pages in again at every call. Process-wide
    and not undone; call it once, before timing. Returns whether the heap is held (False
    where the C library is not glibc: nothing is changed there)."""
    if _state["held"]:
        return True
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_TRIM_THRESHOLD, _KEEP) and libc.mallopt(_M_TOP_PAD, _PAD)
    mmap = libc.mallopt(_M_MMAP_THRESHOLD, _KEEP) or libc.mallopt(_M_MMAP_THRESHOLD, _FALLBACK_MMAP)
    ok = ok and mmap
    _state["held"] = bool(ok)
    return _state["held"]


def page_faults() -> int | None:
    """The minor page faults this process has taken so far (None where the platform does not
    count them): their growth over a pass is the pages it faulted in."""
    try:
        import resource
    except ImportError:  # (Windows)
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def heap_state() -> str:
    """What a timing in this process ran under, for reports: "held" (`hold_heap`), the
    allocator or malloc settings the environment set up ("LD_PRELOAD=...",
    "GLIBC_TUNABLES=..."), or "default" (the C library's own policy)."""
    if _state["held"]:
        return "held"
    for name in ("LD_PRELOAD", "GLIBC_TUNABLES"):
        value = os.environ.get(name, "")
        if "malloc" in value:  # (jemalloc, tcmalloc, glibc.malloc.*)
            return f"{name}={value}"
    return "default"
