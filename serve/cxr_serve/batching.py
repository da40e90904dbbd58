"""Dynamic batching for the standalone service: requests that arrive together share one model run.

A :class:`Batcher` takes items one by one (:meth:`Batcher.submit`) and runs them in batches of at
most ``max_batch`` in one worker thread, so one model run is under way at a time and the requests
that arrive while it runs form the next batch. A batch waits for more items at most
``max_wait_s`` after its first, and only while more may come: ``pending()`` says how many items
are on their way (requests still decoding), so a lone request never waits. Under Ray Serve the
same role is played by ``serve.batch`` (:mod:`cxr_serve.ray_serve`).

Examples:
    >>> import asyncio
    >>> b = Batcher(lambda items: [x * 2 for x in items], max_batch=4, max_wait_s=0.005)
    >>> async def main():
    ...     return await asyncio.gather(*(b.submit(x) for x in range(5)))
    >>> asyncio.run(main())
    [0, 2, 4, 6, 8]
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Sequence, Tuple


class Batcher:
    """Batches submitted items for ``run(items) -> results`` (same length, same order)."""

    def __init__(self, run: Callable[[Sequence[Any]], Sequence[Any]], max_batch: int = 16, max_wait_s: float = 0.005,
                 pending: Optional[Callable[[], int]] = None) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be at least 1 and max_wait_s not negative")
        self.run, self.max_batch, self.max_wait_s = run, int(max_batch), float(max_wait_s)
        self.pending = pending
        self._queue: Optional[asyncio.Queue] = None
        self._worker: Optional[asyncio.Task] = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-model")
        self._running = 0

    async def submit(self, item: Any) -> Any:
        """Put ``item`` into the next batch and wait for its result (its exception, if the run failed)."""
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        future = loop.create_future()
        self._queue.put_nowait((item, future))
        return await future

    def depth(self) -> int:
        """Items waiting for a model run."""
        return self._queue.qsize() if self._queue is not None else 0

    def _more_may_come(self, have: int) -> bool:
        if self.pending is None:
            return True
        return self.pending() - self._running > have

    async def _gather(self) -> List[Tuple[Any, asyncio.Future]]:
        """The next batch: the first item, then more until full, the wait is over, or none is on its way."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0 or not self._more_may_come(len(batch)):
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), min(left, 0.001)))
            except asyncio.TimeoutError:
                continue
        return [(item, future) for item, future in batch if not future.cancelled()]

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            self._running = len(batch)
            try:
                results = await loop.run_in_executor(self._executor, self.run, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
            except Exception as exc:  # every caller of this batch gets the error, the worker goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
            finally:
                self._running = 0

    def close(self) -> None:
        """Stop the worker and its thread."""
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
