"""Measuring: CPU/RSS monitors, latency summaries, the time budget, serial and concurrent loops."""
from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence


log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- measuring
class Monitor:
    """CPU seconds and peak RSS of some processes while a case runs.

    RSS is sampled every ``interval`` seconds in a thread (sum over the processes);
    CPU time is the difference of their ``cpu_times`` (user + system, children
    included for this process) between entry and exit.
    """

    def __init__(self, pids: Callable[[], Iterable[int]] | None = None, interval: float = 0.05):
        self.pids = pids or (lambda: [os.getpid()])
        self.interval = interval
        self.peak_rss = 0
        self.start_rss = 0
        self.cpu_seconds = 0.0
        self.wall = 0.0
        self._stop = threading.Event()

    def _procs(self):
        import psutil

        procs = []
        for pid in self.pids():
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                continue
        return procs

    @staticmethod
    def _cpu(procs) -> float:
        import psutil

        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
        return total

    def _rss(self) -> int:
        import psutil

        total = 0
        for p in self._sampled:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self._rss())

    def __enter__(self) -> "Monitor":
        self._sampled = self._procs()
        self.start_rss = self.peak_rss = self._rss()
        self._cpu0 = self._cpu(self._sampled)
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._rss())
        self.cpu_seconds = self._cpu(self._sampled) - self._cpu0

    def report(self, prefix: str = "") -> dict:
        return {f"{prefix}cpu_util": round(self.cpu_seconds / self.wall, 2) if self.wall else None,
                f"{prefix}rss_peak_mb": round(self.peak_rss / 2**20)}


def latency_summary(latencies: Sequence[float], wall: float, studies: int | None = None) -> dict:
    """Throughput (studies per wall second) and latency percentiles in ms."""
    lat = sorted(latencies)
    n = studies if studies is not None else len(lat)
    if not lat:
        return {"n": 0}
    p = lambda q: lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))] * 1000  # noqa: E731
    return {"n": n, "wall_s": round(wall, 3), "throughput": round(n / wall, 3) if wall else None,
            "p50_ms": round(statistics.median(lat) * 1000, 1), "p99_ms": round(p(0.99), 1),
            "mean_ms": round(statistics.fmean(lat) * 1000, 1)}


class Clock:
    """Shares the run's time budget among the cases still to run.

    A case gets ``case_seconds`` unless the remaining budget divided by the cases left
    is smaller; never less than ``floor`` seconds (a case also stops after its request
    count, and always runs its minimum number of requests).
    """

    def __init__(self, budget: float, case_seconds: float, cases: int, floor: float = 1.0):
        self.start = time.perf_counter()
        self.budget = budget
        self.case_seconds = case_seconds
        self.cases_left = max(1, cases)
        self.floor = floor

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def take(self, weight: float = 1.0) -> float:
        remaining = self.budget - self.elapsed
        share = remaining / max(1, self.cases_left)
        self.cases_left = max(1, self.cases_left - 1)
        return max(self.floor, min(self.case_seconds, share) * weight)


def run_serial(call: Callable[[int], Any], *, n: int, seconds: float, min_n: int = 1) -> tuple[list[float], float, list]:
    """``call(i)`` for i = 0, 1, ... until ``n`` calls or ``seconds`` (at least ``min_n``)."""
    latencies, results = [], []
    start = time.perf_counter()
    i = 0
    while i < n and (i < min_n or time.perf_counter() - start < seconds):
        t = time.perf_counter()
        results.append(call(i))
        latencies.append(time.perf_counter() - t)
        i += 1
    return latencies, time.perf_counter() - start, results


def run_concurrent(call: Callable[[int], Any], *, n: int, seconds: float, concurrency: int,
                   min_n: int = 1) -> tuple[list[float], float, list, int]:
    """``concurrency`` clients calling ``call(i)`` until ``n`` calls or ``seconds`` pass.

    Returns per-request latencies, wall time, results (None for failures), failures.
    """
    lock = threading.Lock()
    counter = iter(range(n))
    latencies: list[float] = []
    results: list = [None] * n
    failures = 0
    start = time.perf_counter()

    def client() -> None:
        nonlocal failures
        while True:
            with lock:
                if time.perf_counter() - start > seconds and len(latencies) >= min_n:
                    return
                i = next(counter, None)
            if i is None:
                return
            t = time.perf_counter()
            try:
                out = call(i)
            except Exception as err:  # a failed request is counted, never fatal to the run
                log.warning("request %d failed: %s", i, err)
                with lock:
                    failures += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - t)
                results[i] = out

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    return latencies, time.perf_counter() - start, results, failures
