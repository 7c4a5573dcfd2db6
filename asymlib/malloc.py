"""A caching memory allocator for the command line's CPU runs.

A CPU training step allocates and frees tensors of tens of megabytes (activations, their gradients, the
pooling layers' indices). glibc's malloc gives blocks that large back to the OS when they are freed, so
every step faults their pages in again: on this machine a fresh 33 MB tensor takes 10-47 ms to zero, a
reused one under 1 ms. tcmalloc (or jemalloc) keeps freed memory for the next step. Measured here
(Poggio's net, bp, batch 500, median of 20 steps): fp32 283-299 -> 223 ms at 2 threads, 477 -> 400 ms at
one; bf16 channels-last within noise (107 -> 92 ms in one run, 101 -> 102 in another); the dense nets,
whose tensors are small, do not change. The numbers are the same bits (tested); only the time changes.

``python -m asymlib``, ``python -m asymlib.book`` and ``python -m asymlib.bench`` start with
:func:`preload_allocator`: where tcmalloc (Debian/Ubuntu: ``apt install libtcmalloc-minimal4``) or jemalloc
(``libjemalloc2``) is installed and not loaded yet, the process restarts itself once with it in
``LD_PRELOAD``, before torch is imported; what it starts (``--jobs`` workers, the book's notebook
kernels) inherits it. ``ASYMLIB_MALLOC=system`` keeps the system's malloc, ``ASYMLIB_MALLOC=<path>``
names the library to preload. Each stored run records the allocator it ran with (``env["malloc"]``).
In your own script: ``LD_PRELOAD=libtcmalloc_minimal.so.4 python train.py``; the benchmark's first
line names the allocator it ran with.
"""
from __future__ import annotations

import ctypes.util
import os
import sys

__all__ = ["allocator_in_use", "find_allocator", "preload_allocator", "ENTRY_POINTS"]

#: the modules whose ``python -m`` run restarts with a caching allocator
ENTRY_POINTS = ("asymlib", "asymlib.book", "asymlib.bench")
_KNOWN = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "jemalloc": ("jemalloc",)}
_GUARD = "_ASYMLIB_MALLOC_RESTARTED"   # set before the restart, so that a failed preload never loops


def allocator_in_use() -> str:
    """``"tcmalloc"``, ``"jemalloc"`` or ``"system"``: the malloc this process runs with (Linux: from its
    memory map; elsewhere ``"system"``)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "system"
    return next((name for name in _KNOWN if f"lib{name}" in maps), "system")


def find_allocator() -> str | None:
    """The library to preload: ``$ASYMLIB_MALLOC`` when it names a file, else the first of tcmalloc and
    jemalloc the dynamic linker knows (None when neither is installed, or ``ASYMLIB_MALLOC=system``)."""
    choice = os.environ.get("ASYMLIB_MALLOC", "")
    if choice == "system":
        return None
    if choice:
        if not os.path.isfile(choice):
            raise ValueError(f"ASYMLIB_MALLOC={choice!r} is not a file; give the path of a malloc library "
                             f"(e.g. /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4) or 'system'")
        return choice
    for names in _KNOWN.values():
        for name in names:
            lib = ctypes.util.find_library(name)
            if lib:
                return lib
    return None


def preload_allocator(module: str) -> None:
    """Restart this ``python -m <module>`` process with a caching allocator preloaded, when one is
    installed, none is loaded and ``module`` is one of :data:`ENTRY_POINTS`; otherwise do nothing.
    Called by ``asymlib/__init__.py`` before torch is imported."""
    if (module not in ENTRY_POINTS or not sys.platform.startswith("linux") or os.environ.get(_GUARD)
            or allocator_in_use() != "system"):
        return
    lib = find_allocator()
    if lib is None:
        return
    env = dict(os.environ, **{_GUARD: "1", "LD_PRELOAD": " ".join(filter(None, (lib, os.environ.get("LD_PRELOAD"))))})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _module_being_run() -> str | None:
    """``"asymlib.bench"`` while ``python -m asymlib.bench`` imports its package (then ``sys.argv[0]`` is
    ``"-m"``), else None."""
    argv = getattr(sys, "orig_argv", [])
    if sys.argv[:1] != ["-m"] or "-m" not in argv[1:]:
        return None
    i = argv.index("-m", 1)
    return argv[i + 1] if i + 1 < len(argv) else None
