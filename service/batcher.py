"""Per-model micro-batcher feeding a pool of compute workers: requests wait in a bounded queue (counted in images);
one dispatcher forms batches and hands each to whichever worker is free, so the event loop keeps accepting,
decoding and answering meanwhile and every worker stays busy while there is work.

Work goes when a worker is free and `max_batch_size` images are queued or the oldest has waited `max_delay_s`; it
is then split evenly between the free workers (shares of at most `max_batch_size` images, at least a quarter of it),
so that requests arriving together keep every worker busy instead of one. Only requests with the same purification
settings (mode, epsilon) share a batch. A request is never split between batches; one larger than `max_batch_size`
forms a batch alone (and is computed in chunks).

Failure isolation: a queued image is pixels, or an image file whose header was checked before it was queued
(service/batch_images.py); a file whose pixels then fail to decode in the worker fails its own request only
(ImageUndecodable, a 422), while its batch-mates get their answers. A batch fails on a compute error or a result
without exactly one row per image (WrongRowCount), and then only that batch's requests fail (BatchFailed, their
request ids logged); the workers keep going. A worker that dies during a batch (WorkerDied: killed, crashed)
is restarted, and its batch — purification is a pure function — is computed again first thing by the next free
worker; a batch during which workers died twice fails alone, so one poisonous input cannot take the pool down.
Requests cancelled while queued (deadline passed, client gone) leave the queue at once and are never computed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .batch_images import BatchImages, RequestImages
from .predict import PredictionRows, Predictions, PurifyRequest, predict_in_chunks

log = logging.getLogger("service.batcher")

MAX_ATTEMPTS = 2  # a batch whose worker died is computed once more; twice dead -> it fails alone


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


class ImageUndecodable(Exception):
    """An image file of this request passed its header check but its pixels could not be decoded in the worker
    (truncated, corrupt): `row` is its index in the request, of `count` images."""

    def __init__(self, row: int, count: int, detail: str) -> None:
        super().__init__(detail)
        self.row, self.count, self.detail = row, count, detail


class DeadlineExceeded(Exception):
    """The request was still queued at its deadline (set on its future by the batcher's one deadline timer)."""


class ClientGone(Exception):
    """The client disconnected while its request was still queued."""


class WorkerDied(RuntimeError):
    """The worker computing a batch died (killed, crashed). The batch may be innocent, so it is computed again."""


class Worker(Protocol):
    """One compute slot of a model's pool. The batcher calls it from a thread of its own, one batch at a time."""

    index: int  # stable within the pool (0..n-1), also across restarts: a label for logs and metrics

    def start(self) -> None:
        """(Re)start the worker, blocking until it can compute (a process: spawned, model loaded)."""

    def compute(self, images: torch.Tensor | BatchImages, request: PurifyRequest) -> Predictions:
        """Purify and classify one batch, decoding its image files first (or raise; WorkerDied when the worker
        itself died meanwhile)."""

    def close(self) -> None:
        """Stop the worker for good (the service is stopping)."""


@dataclass
class WorkItem:
    """One request's images waiting for, or going through, compute."""

    images: RequestImages
    request: PurifyRequest
    deadline: float
    future: asyncio.Future[ItemResult]
    request_id: str = ""  # for the log when its batch fails
    enqueued_at: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued -> running, or queued -> cancelled

    @property
    def size(self) -> int:
        return len(self.images)


@dataclass
class Batch:
    """Requests computed together; `attempts` counts the workers it was given to."""

    items: list[WorkItem]
    request: PurifyRequest
    started: float = field(default_factory=time.monotonic)
    attempts: int = 0

    @property
    def size(self) -> int:
        return sum(item.size for item in self.items)

    def images(self) -> torch.Tensor | BatchImages:
        """One tensor when every request sent pixels (or was decoded before queueing), else a BatchImages."""
        parts = [it.images for it in self.items]
        tensors = [part for part in parts if isinstance(part, torch.Tensor)]
        if len(tensors) < len(parts):
            return BatchImages(parts)
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


@dataclass
class ItemResult:
    predictions: PredictionRows  # this request's rows of its batch's predictions
    queue_s: float
    compute_s: float
    batch_images: int


@dataclass
class BatchStats:
    """What the batcher reports per finished batch (metrics hook); `predictions` is None when it failed."""

    size: int
    compute_s: float
    queue_waits: list[float]
    predictions: Predictions | None
    request: PurifyRequest
    worker: int = 0


class Batcher:
    """Queue + dispatcher for one model's pool of workers (a compute_queue.ComputeQueue of PurifyRequests). Create and
    use it inside one running event loop."""

    def __init__(
        self,
        name: str,
        workers: Sequence[Worker],
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        if not workers:
            raise ValueError("a batcher needs at least one worker")
        self.name = name
        self.workers = list(workers)
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.chunk_size = max_batch_size  # halved on CUDA out-of-memory, and remembered (same device for all)
        self._on_batch = on_batch or (lambda stats: None)
        self._on_depth = on_depth or (lambda depth: None)
        self._queue: collections.deque[WorkItem] = collections.deque()
        self._depth = 0
        self._pending: collections.Counter[PurifyRequest] = collections.Counter()  # queued images per settings
        self._free: collections.deque[Worker] = collections.deque()  # warm workers waiting for a batch
        self._retries: collections.deque[Batch] = collections.deque()  # batches whose worker died, go first
        self._inflight: set[asyncio.Task[None]] = set()
        self._wakeup: asyncio.Event | None = None
        self._closing = False
        self._draining = False
        self._task: asyncio.Task[None] | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None  # one timer for the earliest queued deadline
        self._executor = ThreadPoolExecutor(max_workers=len(self.workers), thread_name_prefix=f"soap-{name}")
        self._seconds_per_image = 0.0  # moving average of one worker's compute, for Retry-After

    # ------------------------------------------------------------------ request side (event loop)

    @property
    def depth(self) -> int:
        """Images waiting (not yet in a running batch)."""
        return self._depth

    def has_room(self, images: int = 1) -> bool:
        return self._depth + images <= self.max_queue

    def retry_after_s(self) -> int:
        """Whole seconds until the current queue has probably drained (at least 1)."""
        return max(1, math.ceil(self._depth * self._seconds_per_image / len(self.workers)))

    def submit(self, images: RequestImages, request: PurifyRequest, deadline: float, request_id: str = "") -> WorkItem:
        """Queue a request's images (pixels, or header-checked files), or raise QueueFull / ShuttingDown at once."""
        if self._closing or self._draining:
            raise ShuttingDown("the service is shutting down")
        if not self.has_room(len(images)):
            raise QueueFull(self.retry_after_s())
        item = WorkItem(images, request, deadline, asyncio.get_running_loop().create_future(), request_id)
        self._queue.append(item)
        self._pending[request] += item.size
        self._set_depth(self._depth + item.size)
        if self._deadline_timer is None:
            self._arm_deadline_timer()
        # Wake the dispatcher only when it has something new to decide: a first item, or a full batch.
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

    def start(self, warmup: Callable[[Worker], None] | None = None) -> asyncio.Task[None]:
        """Start the dispatcher; `warmup(worker)` runs first for every worker at once, each in its own thread. It
        runs again when a worker is restarted after dying."""
        self._wakeup = wakeup = asyncio.Event()
        self._warmup = warmup
        self._task = asyncio.get_running_loop().create_task(self._run(wakeup), name=f"batcher-{self.name}")
        self._task.add_done_callback(self._on_dispatcher_exit)
        return self._task

    def _on_dispatcher_exit(self, task: asyncio.Task[None]) -> None:
        """If the dispatcher died (a warm-up failed, or a bug), fail what is queued instead of leaving it hanging;
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
        while self._retries:
            self._fail(self._retries.popleft(), error)
        self._pending.clear()
        self._set_depth(0)
        self._arm_deadline_timer()  # cancels the timer: the queue is empty

    def drain(self) -> None:
        """Refuse new work and stop waiting for batch-mates: nothing more is coming, run what is queued now."""
        self._draining = True
        self._wake()

    async def close(self) -> None:
        """Refuse new work, finish everything already queued, then stop the dispatcher and its threads."""
        self._closing = True
        self._wake()
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - the dispatcher already died and was logged by _on_dispatcher_exit
                pass
        if self._inflight:  # only after a dispatcher failure: let running batches answer their requests
            await asyncio.gather(*self._inflight, return_exceptions=True)
        self._executor.shutdown(wait=True)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # ------------------------------------------------------------------ dispatcher

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

    @staticmethod
    async def _sleep_until_woken(wakeup: asyncio.Event) -> None:
        wakeup.clear()
        await wakeup.wait()

    async def _run(self, wakeup: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        if self._warmup is not None:
            await asyncio.gather(*(loop.run_in_executor(self._executor, self._warmup, w) for w in self.workers))
        self._free.extend(self.workers)
        while True:
            if not self._free:
                await self._sleep_until_woken(wakeup)  # a worker coming back wakes us
                continue
            if self._retries:
                self._launch(self._retries.popleft())
                continue
            if not self._queue:
                if self._closing and not self._inflight:
                    return
                await self._sleep_until_woken(wakeup)
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
                wakeup.clear()
                try:
                    await asyncio.wait_for(wakeup.wait(), remaining)
                except TimeoutError:
                    break
            if head.state != "queued" or self._retries:
                continue  # the head was cancelled, or a retry came first: decide again
            self._launch_shares(head.request)

    def _launch_shares(self, request: PurifyRequest) -> None:
        """The queued images of `request` are due: split them evenly between the free workers, in shares of at
        most max_batch_size and at least a quarter of it. One batch on one worker while another idles halves the
        pool's throughput whenever requests arrive together (e.g. the clients one batch answered sending their next
        requests); shares smaller than a quarter batch cost more per image than the second worker gains (HTTP at
        concurrency 8: splitting the ~8 queued images in two served 0.93x, benchmarks/service_ab.py)."""
        pending = self._pending[request]
        shares = max(1, min(len(self._free), pending // max(1, self.max_batch_size // 4)))
        share = min(self.max_batch_size, math.ceil(pending / shares))
        for _ in range(shares):
            if self._pending[request] == 0:
                break
            self._launch(Batch(self._take(request, share), request))

    def _launch(self, batch: Batch) -> None:
        worker = self._free.popleft()
        self._inflight.add(asyncio.get_running_loop().create_task(self._execute(worker, batch)))

    def _take(self, request: PurifyRequest, limit: int) -> list[WorkItem]:
        """Remove up to `limit` images of requests sharing `request`, oldest first (one pass; a request larger than
        `limit` goes alone)."""
        batch: list[WorkItem] = []
        rest: collections.deque[WorkItem] = collections.deque()
        total = 0
        full = False
        for item in self._queue:
            if full or item.request != request or (batch and total + item.size > limit):
                full = full or (item.request == request and bool(batch))
                rest.append(item)
                continue
            batch.append(item)
            item.state = "running"
            total += item.size
            full = total >= limit
        self._queue = rest
        self._unpend(request, total)
        self._set_depth(self._depth - total)
        return batch

    async def _execute(self, worker: Worker, batch: Batch) -> None:
        """Run one batch on `worker`, then give the worker back (the dispatcher sees both at once when it wakes)."""
        try:
            await self._compute_batch(worker, batch)
        finally:
            self._inflight.discard(asyncio.current_task())
            self._free.append(worker)
            self._wake()

    async def _compute_batch(self, worker: Worker, batch: Batch) -> None:
        loop = asyncio.get_running_loop()
        batch.attempts += 1
        images = batch.images()
        started = time.monotonic()
        try:
            predictions = await loop.run_in_executor(self._executor, self._compute, worker, images, batch.request)
        except WorkerDied as exc:
            await self._after_death(worker, batch, exc)
            return
        except Exception as exc:  # noqa: BLE001 - isolate: fail this batch only, keep the worker
            ids = [it.request_id or "?" for it in batch.items]
            log.exception(
                "batch of %d images on model %s worker %d failed; requests %s",
                batch.size, self.name, worker.index, ", ".join(ids), extra={"request_ids": ids},
            )  # fmt: skip
            self._fail(batch, self._batch_failed(exc), worker)
            return
        compute_s = time.monotonic() - started
        n = len(images)
        per_image = compute_s / n
        self._seconds_per_image = (
            0.8 * self._seconds_per_image + 0.2 * per_image if self._seconds_per_image else per_image
        )
        waits = [batch.started - it.enqueued_at for it in batch.items]
        self._on_batch(BatchStats(n, compute_s, waits, predictions, batch.request, worker.index))
        offset = 0
        for item, wait in zip(batch.items, waits, strict=True):
            if not item.future.done():
                bad = (
                    [row for row in range(item.size) if offset + row in predictions.rejected]
                    if predictions.rejected
                    else []
                )
                if bad:
                    detail = predictions.rejected[offset + bad[0]]
                    item.future.set_exception(ImageUndecodable(bad[0], item.size, detail))
                else:
                    item.future.set_result(ItemResult(predictions.rows(offset, offset + item.size), wait, compute_s, n))
            offset += item.size

    async def _after_death(self, worker: Worker, batch: Batch, exc: WorkerDied) -> None:
        """Give the batch to the next free worker (first in line) unless it has now seen two workers die; restart
        this worker in its own thread meanwhile (it rejoins the pool when warm again)."""
        ids = [it.request_id for it in batch.items]
        if batch.attempts < MAX_ATTEMPTS:
            log.warning(
                "model %s worker %d died during a batch of %d images (%s); computing it again (requests %s)",
                self.name, worker.index, batch.size, exc, ids, extra={"request_ids": ids},
            )  # fmt: skip
            self._retries.append(batch)
            self._wake()
        else:
            log.error(
                "model %s: workers died twice computing a batch of %d images (%s); failing it alone (requests %s)",
                self.name, batch.size, exc, ids, extra={"request_ids": ids},
            )  # fmt: skip
            self._fail(batch, self._batch_failed(exc), worker)
        if self._warmup is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._warmup, worker)
            except Exception:  # noqa: BLE001 - it restarts again on its next batch; that batch fails if it cannot
                log.exception("model %s worker %d did not restart", self.name, worker.index)

    def _batch_failed(self, exc: BaseException) -> BatchFailed:
        return BatchFailed(
            f"the batch holding this request failed ({type(exc).__name__}); other requests are unaffected"
        )

    def _fail(self, batch: Batch, error: BatchFailed, worker: Worker | None = None) -> None:
        for item in batch.items:
            if not item.future.done():
                item.future.set_exception(error)
        waits = [batch.started - it.enqueued_at for it in batch.items]
        stats = BatchStats(batch.size, time.monotonic() - batch.started, waits, None, batch.request)
        if worker is not None:
            stats.worker = worker.index
        self._on_batch(stats)

    def _compute(self, worker: Worker, images: torch.Tensor | BatchImages, request: PurifyRequest) -> Predictions:
        predictions, self.chunk_size = predict_in_chunks(lambda x: worker.compute(x, request), images, self.chunk_size)
        rows = sorted({t.shape[0] if t.ndim else -1 for t in predictions.tensors()})
        if rows != [len(images)] or any(not 0 <= row < len(images) for row in predictions.rejected):
            raise WrongRowCount(f"the compute returned {rows} rows for {len(images)} images")
        return predictions
