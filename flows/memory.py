"""Peak memory per pipeline stage, sampled in a background thread.

The demo has a 6 GB budget. `ru_maxrss` only gives the process's lifetime peak, which cannot say
which stage set it, so a thread samples the resident set size of this process and of its children
(Prefect's temporary server, data loader workers) and keeps the peak of each stage. The pipeline
prints the table at the end and logs it to MLflow as ``memory.<stage>.peak_rss_mb``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import psutil

MB = 1024 * 1024


@dataclass
class StagePeak:
    process_mb: float = 0.0  # this process alone: what `/usr/bin/time -v` reports
    total_mb: float = 0.0  # this process plus its children: what the machine must hold


@dataclass
class StageMemory:
    """``with StageMemory() as m: m.begin("label"); ...``: each stage's peak, in the order run."""

    interval_s: float = 0.2
    peaks: dict[str, StagePeak] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._process = psutil.Process()
        self._current: StagePeak | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        try:
            own = self._process.memory_info().rss
            children = 0
            for child in self._process.children(recursive=True):
                try:
                    children += child.memory_info().rss
                except psutil.Error:  # the child ended between listing and reading
                    pass
        except psutil.Error:
            return
        with self._lock:
            if self._current is not None:
                self._current.process_mb = max(self._current.process_mb, own / MB)
                self._current.total_mb = max(self._current.total_mb, (own + children) / MB)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> StageMemory:
        self._thread = threading.Thread(target=self._loop, name="stage-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def begin(self, name: str) -> None:
        """Attribute what follows, until the next `begin`, to stage ``name``."""
        self._sample()
        with self._lock:
            self._current = self.peaks.setdefault(name, StagePeak())
        self._sample()

    def metrics(self) -> dict[str, float]:
        out = {}
        for name, peak in self.peaks.items():
            out[f"memory.{name}.peak_rss_mb"] = round(peak.process_mb, 1)
            out[f"memory.{name}.peak_total_mb"] = round(peak.total_mb, 1)
        return out

    def table(self) -> str:
        rows = [f"{'stage':<18}{'peak RSS MB':>12}{'with children':>15}"]
        for name, peak in self.peaks.items():
            rows.append(f"{name:<18}{peak.process_mb:>12.0f}{peak.total_mb:>15.0f}")
        return "\n".join(rows)
