"""Dynamic micro-batching of /predict requests onto one inference thread.

Requests put their preprocessed images in a bounded queue; a collector task takes the first waiting request,
waits at most `max_wait_s` for more (up to `max_batch_size` images), and runs the batch on a single-thread
executor while it collects the next one. Each batch reads the served version's reference once, so all its images
use exactly one version, which the response names. A full queue answers 429 at once instead of letting latency
grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from service.errors import api_error
from service.inference.snapshot import ServedVersion

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchResult:
    """Probabilities of one request's images, and the version that produced them."""

    served: ServedVersion
    probabilities: Tensor  # (n, C)


@dataclass
class _Pending:
    images: Tensor
    future: asyncio.Future[BatchResult]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Collects requests into batches and runs them one batch at a time.

    Args:
        served: Returns the served version (read once per batch).
        max_batch_size: Most images per batch (a larger single request runs as its own batch).
        max_wait_s: How long the first request of a batch waits for company.
        max_queue_images: Images allowed to wait; beyond it `submit` raises 429 overloaded.
        threads: Torch threads of the inference thread.
        on_batch: Called with the size and the model seconds of each batch run (metrics).
        on_queue: Called with the number of images waiting whenever it changes: when a request is queued, when
            requests are taken into a batch, and when stop fails the rest (metrics).
    """

    def __init__(
        self,
        served: Callable[[], ServedVersion],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_images: int,
        threads: int,
        on_batch: Callable[[int, float], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
    ) -> None:
        self._served = served
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self._on_batch = on_batch
        self._on_queue = on_queue
        self._queue: deque[_Pending] = deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._threads = threads
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="care-inference")
        self._task: asyncio.Task[None] | None = None
        self._seconds_per_image = 0.05  # running estimate, for Retry-After

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def _add_queued(self, count: int) -> None:
        if count == 0:
            return
        self._queued_images += count
        if self._on_queue is not None:
            self._on_queue(self._queued_images)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="care-batcher")

    async def stop(self) -> None:
        """Stop collecting; the running batch finishes, requests still waiting fail with 503 so clients retry."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_all(list(self._queue))
        self._queue.clear()
        self._add_queued(-self._queued_images)
        await asyncio.to_thread(self._executor.shutdown, True)

    @staticmethod
    def _fail_all(pending: list[_Pending]) -> None:
        for item in pending:
            if not item.future.done():
                item.future.set_exception(api_error("shutting_down"))

    async def submit(self, images: Tensor) -> BatchResult:
        """Queue preprocessed images (n, 3, H, W) and wait for their probabilities."""
        count = int(images.shape[0])
        if self._queued_images + count > self.max_queue_images:
            raise api_error(
                "overloaded",
                queued_images=self._queued_images,
                retry_after_s=self._queued_images * self._seconds_per_image,
            )
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(images, future))
        self._add_queued(count)
        self._wakeup.set()
        return await future

    async def _next_batch(self) -> list[_Pending]:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = [self._queue.popleft()]
        size = int(batch[0].images.shape[0])
        self._add_queued(-size)
        deadline = batch[0].enqueued + self.max_wait_s
        try:
            while size < self.max_batch_size:
                if self._queue:
                    following = int(self._queue[0].images.shape[0])
                    if size + following > self.max_batch_size:
                        break
                    batch.append(self._queue.popleft())
                    size += following
                    self._add_queued(-following)
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
        except asyncio.CancelledError:
            # Stopped while collecting: the requests taken so far go back to the front of the queue, where stop()
            # fails them with 503 (else their clients would wait forever) and counts them out of the queue.
            self._queue.extendleft(reversed(batch))
            self._add_queued(size)
            raise
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        in_flight: asyncio.Future[None] | None = None
        batch: list[_Pending] = []
        try:
            while True:
                if in_flight is not None:
                    # Requests queue up while a batch runs, and the next batch is closed only once the executor is
                    # free: closing it earlier (after max_wait) would send small batches under load and halve the
                    # throughput. Shielded: cancelling this task (stop) must not cancel the running batch.
                    await asyncio.shield(in_flight)
                batch = await self._next_batch()
                in_flight = loop.run_in_executor(self._executor, self._infer, batch, loop)
                batch = []
        except asyncio.CancelledError:
            self._fail_all(batch)  # collected but never started
            raise

    def _infer(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        # Torch sizes a thread's OpenMP team lazily, from the last count set by any thread (the decoding pool sets
        # 1); asking first completes that lazy step, so the count set here is the one this thread keeps.
        if torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)
        served = self._served()
        images = torch.cat([p.images for p in batch]) if len(batch) > 1 else batch[0].images
        started = time.perf_counter()
        try:
            probabilities = served.probabilities(images)
        except Exception as exc:
            logger.exception("inference failed for a batch of %d images", len(images))
            for pending in batch:
                loop.call_soon_threadsafe(_fail, pending.future, exc)
            return
        elapsed = time.perf_counter() - started
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / len(images)
        if self._on_batch is not None:
            self._on_batch(len(images), elapsed)
        offset = 0
        for pending in batch:
            count = int(pending.images.shape[0])
            result = BatchResult(served, probabilities[offset : offset + count])
            loop.call_soon_threadsafe(_resolve, pending.future, result)
            offset += count


def _resolve(future: asyncio.Future[BatchResult], result: BatchResult) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[BatchResult], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
