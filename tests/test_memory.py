"""Peak memory per stage: an allocation is charged to the stage that made it."""

from __future__ import annotations

import time

import numpy as np

from esvr.flows.memory import StageMemory
from esvr.models.memory import return_freed_memory


def test_allocation_is_charged_to_its_stage():
    with StageMemory(interval_s=0.05) as memory:
        memory.begin("small")
        time.sleep(0.2)
        memory.begin("large")
        block = np.ones(300 * 1024 * 1024 // 8)  # 300 MB, touched
        time.sleep(0.2)
        del block
        return_freed_memory()
        memory.begin("after")
        time.sleep(0.2)
    small, large, after = (memory.peaks[n].process_mb for n in ("small", "large", "after"))
    assert large - small > 250
    assert after < large - 250  # freed and handed back: a later stage does not inherit it
    assert list(memory.peaks) == ["small", "large", "after"]
    metrics = memory.metrics()
    assert metrics["memory.large.peak_rss_mb"] == round(large, 1)
    assert "large" in memory.table()


def test_freed_heap_goes_back_to_the_system():
    """Small objects live in glibc's heap, which keeps freed pages unless trimmed: one live object
    in 64 is enough to pin the rest without `return_freed_memory`."""
    import psutil

    process = psutil.Process()
    blocks = [bytearray(1000) for _ in range(300_000)]  # ~300 MB, below malloc's mmap threshold
    survivors = blocks[::64]
    del blocks
    held = process.memory_info().rss
    return_freed_memory()
    assert held - process.memory_info().rss > 150 * 1024 * 1024
    assert len(survivors) == 300_000 // 64 + 1


def test_a_collection_on_request_runs_only_after_a_model_was_freed(monkeypatch):
    import gc

    from esvr.models import memory

    collections = []
    monkeypatch.setattr(gc, "collect", lambda: collections.append(1) or 0)
    return_freed_memory()  # explicit: always
    return_freed_memory(if_freed=True)  # nothing freed since: a cached stage pays nothing
    assert len(collections) == 1
    memory.mark_freed()
    return_freed_memory(if_freed=True)
    return_freed_memory(if_freed=True)
    assert len(collections) == 2
