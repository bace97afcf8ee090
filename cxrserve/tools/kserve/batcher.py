"""Micro-batching: concurrent requests for one model share one ``pipeline.predict`` call.

Like TorchServe's frontend, a batch holds up to the archive's ``batchSize`` requests and
waits at most its ``maxBatchDelay`` to fill; each request still gets its own answer, and
if a whole batch fails its requests are retried one by one so a bug triggered by one
input does not fail its neighbours.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from cxrserve.core.errors import CXRInputError

log = logging.getLogger(__name__)


class MicroBatcher:
    """Gathers concurrent submissions into one call of ``fn(list) -> list`` on one thread.

    The first waiting item opens a batch; the batch closes when it holds ``max_batch``
    items or ``max_delay`` seconds have passed since it opened. Items that arrive while
    a batch runs form the next one. ``fn`` runs on a single worker thread (a pipeline
    is not re-entrant), off the event loop. ``on_batch(n)`` is told each batch's size.
    """

    def __init__(self, fn: Callable[[list], list], max_batch: int, max_delay_s: float, name: str = "",
                 on_batch: Callable[[int], None] | None = None):
        self.fn, self.max_batch, self.max_delay = fn, max(1, max_batch), max(0.0, max_delay_s)
        self.on_batch = on_batch
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"batch-{name}")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run())
        future = loop.create_future()
        await self._queue.put((item, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.max_delay
            while len(batch) < self.max_batch:
                try:
                    batch.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [(item, fut) for item, fut in batch if not fut.done()]  # cancelled callers
            if not batch:
                continue
            if self.on_batch:
                self.on_batch(len(batch))
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self.executor, self.fn, items)
            except Exception as err:  # noqa: BLE001 - isolate: retry each item alone
                if len(items) == 1:
                    results = [err]
                else:
                    log.warning("batch of %d failed (%s): retrying its requests one by one", len(items),
                                type(err).__name__)
                    results = []
                    for item in items:
                        try:
                            results.append((await loop.run_in_executor(self.executor, self.fn, [item]))[0])
                        except Exception as one:  # noqa: BLE001
                            results.append(one)
            for (_, fut), result in zip(batch, results):
                if fut.done():
                    continue
                if isinstance(result, Exception) and not isinstance(result, CXRInputError):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
