"""Per-model micro-batcher: requests wait in a bounded queue (counted in images); one worker forms batches and
runs them in a dedicated thread, so the event loop keeps accepting, decoding and answering meanwhile.

A batch goes when it holds `max_batch_size` images or its oldest image has waited `max_delay_s`. Only requests
with the same purification settings (mode, epsilon) share a batch. A request is never split between batches;
one larger than `max_batch_size` forms a batch alone (and is computed in chunks).

Failure isolation: images were decoded before they were queued, so a batch only fails on a compute error or a
result without exactly one row per image (WrongRowCount), and then only that batch's requests fail (BatchFailed,
their request ids logged); the worker keeps going. Requests cancelled while queued
(deadline passed, client gone) leave the queue at once and are never computed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .predict import Predictions, PurifyRequest, predict_in_chunks

log = logging.getLogger("service.batcher")


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the queue is full; retry in about {retry_after_s} s")
        self.retry_after_s = retry_after_s


class BatchFailed(Exception):
    """The batch this request was in raised; the message names the exception type, never a traceback."""


class ShuttingDown(Exception):
    pass


class WrongRowCount(RuntimeError):
    """The compute returned other than one row per image: its rows cannot be matched to requests, so the batch
    fails rather than hand anyone another request's result (Ray Serve and LitServe check the same)."""


class DeadlineExceeded(Exception):
    """The request was still queued at its deadline (set on its future by the batcher's one deadline timer)."""


class ClientGone(Exception):
    """The client disconnected while its request was still queued."""


@dataclass
class WorkItem:
    """One request's images waiting for, or going through, compute."""

    images: torch.Tensor
    request: PurifyRequest
    deadline: float
    future: asyncio.Future
    request_id: str = ""  # for the log when its batch fails
    enqueued_at: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued -> running, or queued -> cancelled

    @property
    def size(self) -> int:
        return self.images.shape[0]


@dataclass
class ItemResult:
    predictions: Predictions
    queue_s: float
    compute_s: float
    batch_images: int


@dataclass
class BatchStats:
    """What the worker reports per batch (metrics hook)."""

    size: int
    compute_s: float
    queue_waits: list[float]
    predictions: Predictions | None
    request: PurifyRequest


class Batcher:
    """Queue + worker for one model. Create and use it inside one running event loop."""

    def __init__(
        self,
        name: str,
        compute: Callable[[torch.Tensor, PurifyRequest], Predictions],
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self.compute = compute
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.chunk_size = max_batch_size  # halved on CUDA out-of-memory, and remembered
        self._on_batch = on_batch or (lambda stats: None)
        self._on_depth = on_depth or (lambda depth: None)
        self._queue: collections.deque[WorkItem] = collections.deque()
        self._depth = 0
        self._pending: collections.Counter[PurifyRequest] = collections.Counter()  # queued images per settings
        self._wakeup: asyncio.Event | None = None
        self._closing = False
        self._draining = False
        self._task: asyncio.Task | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None  # one timer for the earliest queued deadline
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"soap-{name}")
        self._seconds_per_image = 0.0  # moving average, for Retry-After

    # ------------------------------------------------------------------ request side (event loop)

    @property
    def depth(self) -> int:
        """Images waiting (not yet in a running batch)."""
        return self._depth

    def has_room(self, images: int = 1) -> bool:
        return self._depth + images <= self.max_queue

    def retry_after_s(self) -> int:
        """Whole seconds until the current queue has probably drained (at least 1)."""
        return max(1, math.ceil(self._depth * self._seconds_per_image))

    def submit(self, images: torch.Tensor, request: PurifyRequest, deadline: float, request_id: str = "") -> WorkItem:
        """Queue a request's images, or raise QueueFull / ShuttingDown at once."""
        if self._closing or self._draining:
            raise ShuttingDown("the service is shutting down")
        if not self.has_room(images.shape[0]):
            raise QueueFull(self.retry_after_s())
        item = WorkItem(images, request, deadline, asyncio.get_running_loop().create_future(), request_id)
        self._queue.append(item)
        self._pending[request] += item.size
        self._set_depth(self._depth + item.size)
        if self._deadline_timer is None:
            self._arm_deadline_timer()
        # Wake the worker only when it has something new to decide: a first item, or a full batch.
        if len(self._queue) == 1 or self._pending[request] >= self.max_batch_size:
            self._wake()
        return item

    def cancel(self, item: WorkItem, error: BaseException | None = None) -> bool:
        """Take a still-queued item out of the queue and end its future: with `error` (the waiter sees it), or
        cancelled when None. False when its batch already started (the result will come)."""
        if item.state != "queued":
            return False
        item.state = "cancelled"
        self._queue.remove(item)
        self._unpend(item.request, item.size)
        self._set_depth(self._depth - item.size)
        if not item.future.done():
            if error is None:
                item.future.cancel()
            else:
                item.future.set_exception(error)
        self._wake()
        return True

    def _arm_deadline_timer(self) -> None:
        """One timer per batcher, not one per request: it fires at the earliest deadline in the queue."""
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if self._queue:
            earliest = min(item.deadline for item in self._queue)
            self._deadline_timer = asyncio.get_running_loop().call_later(
                max(0.0, earliest - time.monotonic()), self._expire_deadlines
            )

    def _expire_deadlines(self) -> None:
        self._deadline_timer = None
        now = time.monotonic()
        for item in [it for it in self._queue if it.deadline <= now]:
            self.cancel(item, DeadlineExceeded())
        self._arm_deadline_timer()

    # ------------------------------------------------------------------ lifecycle

    def start(self, warmup: Callable[[], None] | None = None) -> asyncio.Task:
        """Start the worker; `warmup` runs first, in the compute thread."""
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(warmup), name=f"batcher-{self.name}")
        self._task.add_done_callback(self._on_worker_exit)
        return self._task

    def _on_worker_exit(self, task: asyncio.Task) -> None:
        """If the worker died (warm-up failed, or a bug), fail what is queued instead of leaving it hanging;
        `running` turns False, so /readyz reports the service not ready."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("batcher %s stopped", self.name, exc_info=task.exception())
        self._closing = True
        error = BatchFailed(f"model {self.name} is not serving ({type(task.exception()).__name__})")
        while self._queue:
            item = self._queue.popleft()
            item.state = "cancelled"
            if not item.future.done():
                item.future.set_exception(error)
        self._pending.clear()
        self._set_depth(0)
        self._arm_deadline_timer()  # cancels the timer: the queue is empty

    def drain(self) -> None:
        """Refuse new work and stop waiting for batch-mates: nothing more is coming, run what is queued now."""
        self._draining = True
        self._wake()

    async def close(self) -> None:
        """Refuse new work, finish everything already queued, then stop the worker and its thread."""
        self._closing = True
        self._wake()
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - the worker already died and was logged by _on_worker_exit
                pass
        self._executor.shutdown(wait=True)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # ------------------------------------------------------------------ worker

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _unpend(self, request: PurifyRequest, images: int) -> None:
        left = self._pending[request] - images
        if left > 0:
            self._pending[request] = left
        else:  # drop the key: clients choose epsilon freely, so keys must not accumulate
            del self._pending[request]

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self._on_depth(depth)

    async def _run(self, warmup: Callable[[], None] | None) -> None:
        loop = asyncio.get_running_loop()
        if warmup is not None:
            await loop.run_in_executor(self._executor, warmup)
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._queue[0]
            due = head.enqueued_at + self.max_delay_s
            while (
                not self._closing
                and not self._draining
                and head.state == "queued"
                and self._pending[head.request] < self.max_batch_size
            ):
                remaining = due - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            if head.state != "queued":
                continue  # the head was cancelled while we waited: start over with the new head
            await self._execute(self._take(head.request))

    def _take(self, request: PurifyRequest) -> list[WorkItem]:
        """Remove up to max_batch_size images of requests sharing `request`, oldest first (one pass)."""
        batch: list[WorkItem] = []
        rest: collections.deque[WorkItem] = collections.deque()
        total = 0
        full = False
        for item in self._queue:
            if full or item.request != request or (batch and total + item.size > self.max_batch_size):
                full = full or (item.request == request and bool(batch))
                rest.append(item)
                continue
            batch.append(item)
            item.state = "running"
            total += item.size
            full = total >= self.max_batch_size
        self._queue = rest
        self._unpend(request, total)
        self._set_depth(self._depth - total)
        return batch

    async def _execute(self, batch: list[WorkItem]) -> None:
        started = time.monotonic()
        request = batch[0].request
        images = batch[0].images if len(batch) == 1 else torch.cat([it.images for it in batch])
        waits = [started - it.enqueued_at for it in batch]
        try:
            predictions = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._compute, images, request
            )
        except Exception as exc:  # noqa: BLE001 - isolate: fail this batch only, keep the worker alive
            log.exception(
                "batch of %d images on model %s failed; requests %s",
                images.shape[0],
                self.name,
                ", ".join(it.request_id or "?" for it in batch),
            )
            error = BatchFailed(
                f"the batch holding this request failed ({type(exc).__name__}); other requests are unaffected"
            )
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            self._on_batch(BatchStats(images.shape[0], time.monotonic() - started, waits, None, request))
            return
        compute_s = time.monotonic() - started
        n = images.shape[0]
        self._seconds_per_image = (
            0.8 * self._seconds_per_image + 0.2 * (compute_s / n) if self._seconds_per_image else compute_s / n
        )
        self._on_batch(BatchStats(n, compute_s, waits, predictions, request))
        offset = 0
        for item, wait in zip(batch, waits, strict=True):
            if not item.future.done():
                item.future.set_result(ItemResult(predictions.rows(offset, offset + item.size), wait, compute_s, n))
            offset += item.size

    def _compute(self, images: torch.Tensor, request: PurifyRequest) -> Predictions:
        predictions, self.chunk_size = predict_in_chunks(lambda x: self.compute(x, request), images, self.chunk_size)
        rows = sorted({t.shape[0] if t.ndim else -1 for t in predictions.tensors()})
        if rows != [images.shape[0]]:
            raise WrongRowCount(f"the compute returned {rows} rows for {images.shape[0]} images")
        return predictions
