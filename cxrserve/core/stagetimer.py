"""Wall-clock seconds per named stage of the batch in flight: what a pipeline's ``timer``
collects and the handler, the KServe-native server and the benchmark read and reset."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager


class StageTimer:
    """Wall-clock seconds per named stage for the batch in flight (exported as metrics).

    Thread-safe: ``cxr-study`` decodes a batch's files in threads.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def reset(self) -> dict[str, float]:
        with self._lock:
            out, self.seconds = self.seconds, {}
        return out
