"""Wall time and peak memory of a piece of work, including child processes (Ray workers)."""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

import psutil


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


class ResourceMonitor:
    """Context manager sampling the process tree's RSS every ``interval`` seconds.

    ``peak_bytes`` is the largest sum seen (sampling can miss short spikes);
    ``wall_seconds`` the elapsed time.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.wall_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        pid = os.getpid()
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_rss(pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> ResourceMonitor:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, tree_rss(os.getpid()))
        self.wall_seconds = time.perf_counter() - self._start
