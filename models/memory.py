"""Handing the memory of freed models back to the system.

glibc keeps freed memory in its arenas: without `malloc_trim` a stage that loaded a model leaves
the process ~2 GB larger for every later stage (measured on the demo), which counts against its
6 GB budget as if the model were still loaded. A full garbage collection to find the model's
reference cycles costs 0.5-1 s in a process that has imported torch and transformers, so the
stages ask for it only when a model was actually freed since the last one (`mark_freed`): a
stage served from the caches loads and frees nothing, and pays nothing.
"""

from __future__ import annotations

import threading

_freed = threading.Event()


def mark_freed() -> None:
    """A model's weights (or a trainer's copy) were just let go: the next collection has work."""
    _freed.set()


def return_freed_memory(*, if_freed: bool = False) -> None:
    """Collect garbage and hand freed heap pages back to the system; with `if_freed`, only when
    `mark_freed` was called since the last collection."""
    if if_freed and not _freed.is_set():
        return
    _freed.clear()
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
