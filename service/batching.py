"""Adaptive batching inside one worker process.

Requests queue up while the model is busy; as soon as it is free, everything queued (up
to `max_batch_size` items) runs as one ONNX Runtime call. So the batch size follows the
load: 1 when traffic is light (no added latency), large under pressure (higher
throughput), the way Triton's dynamic batcher works. `max_wait_s` > 0 additionally holds
a batch open that long for more requests to join.

Why not BentoML's own `batchable=True` dispatcher: it polls the event loop every
millisecond, sheds queued requests with 503 whenever its latency estimate exceeds
`max_latency_ms` (24 % of requests at 32 clients here), and fixes the response to a bare
array, while our routes answer `{"model": ..., "predictions": [...]}`. This batcher is
event-driven and leaves the wire format to the route.

What a request may cost is bounded, so that a service can run for weeks:
- No model run is larger than `max_batch_size` items, nor costs more than `max_run_cost`
  (the runner's own measure: for the LSTM, tokens): a larger request is queued as several
  chunks, whose results are joined (`join`) for its answer. One run of 256 long texts held
  ~1 GiB of ONNX Runtime's memory in each worker after the burst that caused it, and one of
  64 long texts takes 0.7 s, which every request queued behind it waits out; chunks also let
  other requests take turns between them.
- Work whose caller has gone is withdrawn: when the awaiting task is cancelled (the
  client hung up, or its deadline passed), its chunks leave the queue at once and no batch
  is started for them; a chunk already running finishes, nothing after it runs.
- A request that cannot start before its deadline (`Call.deadline`) is refused at once
  (`Shed`, HTTP 503 with Retry-After) when the queue ahead of it would take longer than
  the time it has left, and again when its turn comes after the deadline; a request of
  several chunks, also when it and the work accepted before it would not be done in time.
  A request the client will not wait for is not computed only to be answered 504.
- Large requests take turns: one chunk of a request is queued at a time, so a small
  request waits for one chunk of each large request ahead of it, not for all of them.
- Accepted work is bounded (`max_queue_items`): beyond it, `Overloaded` (503 +
  Retry-After).

The model runs in a dedicated thread: ONNX Runtime releases the GIL, so the event loop
keeps parsing the next requests while a batch computes.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

# Weight of the newest run in the running estimate of one model run's time, which predicts
# how long the queue ahead of a new request takes.
EWMA_WEIGHT = 0.2
MAX_RETRY_AFTER_S = 30


class Overloaded(Exception):
    """The queue is full; the client should retry after `retry_after_s`."""

    def __init__(self, model: str, queued: int, retry_after_s: int = 1) -> None:
        super().__init__(f"{model}: server is at capacity ({queued} items queued); retry shortly")
        self.retry_after_s = retry_after_s


class Shed(Exception):
    """The request cannot start its model run before its deadline."""

    def __init__(
        self, model: str, wait_s: float, left_s: float, what: str = "the queue ahead would take"
    ) -> None:
        super().__init__(
            f"{model}: {what} about {wait_s:.2f} s and this request has "
            f"{max(left_s, 0.0):.2f} s left before its deadline (Request-Timeout or "
            "DLSERVE_REQUEST_TIMEOUT_S); refused now rather than answered late"
        )
        self.retry_after_s = min(MAX_RETRY_AFTER_S, max(1, math.ceil(wait_s)))


# How far a request got (Call.stage), also the label of dlserve_requests_abandoned_total.
STAGES = ("preparing", "queued", "running")


@dataclass
class Call:
    """One client request's life, shared by the guard, the request path and the batcher."""

    deadline: float  # time.perf_counter() by which its first model run must start
    # How far it got: preparing (its input being checked), queued (waiting for a model
    # run), running (a model run has started for it)
    stage: str = "preparing"
    gone: bool = False  # the client hung up


@dataclass
class _Pending:
    payload: Any
    items: int
    cost: int  # in the runner's measure (items, when it has none)
    future: asyncio.Future[Any]
    call: Call | None
    queued_at: float = field(default_factory=time.perf_counter)
    first: bool = True  # its request's first chunk (whose wait is the request's)
    queued: bool = False  # in the queue (a request's later chunks join it in turn)
    taken: bool = False  # out of the queue: run, or refused past its deadline
    withdrawn: bool = False  # its caller left before its turn: skipped, never run


def chunk_bounds(costs: list[int], max_items: int, max_cost: int) -> list[tuple[int, int, int]]:
    """(start, end, cost) of consecutive chunks of items costing `costs`, each of at most
    `max_items` items and `max_cost` (an item that alone costs more is a chunk of its own)."""
    bounds = []
    start, total = 0, 0
    for i, cost in enumerate(costs):
        if i > start and (i - start >= max_items or total + cost > max_cost):
            bounds.append((start, i, total))
            start, total = i, 0
        total += cost
    bounds.append((start, len(costs), total))
    return bounds


class AdaptiveBatcher:
    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[Any]], list[Any]],
        *,
        max_batch_size: int,
        max_queue_items: int,
        max_wait_s: float = 0.0,
        combine: bool = True,
        join: Callable[[list[Any]], Any] | None = None,
        cost: Callable[[Any], list[int]] | None = None,
        max_run_cost: int | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_items = max_queue_items
        self.max_wait_s = max_wait_s
        self.combine = combine  # False (DLSERVE_BATCHING=false): one request's chunk a run
        self._join = join  # the results of one request's chunks → its result
        self._cost = cost if max_run_cost is not None else None  # a part → its items' costs
        self.max_run_cost = max_run_cost or 0
        self._on_batch = on_batch
        self._on_wait = on_wait  # each request's time in the queue, when its batch starts
        self._queue: deque[_Pending] = deque()
        # Items of accepted requests not yet run (bounded by max_queue_items), and of the
        # chunks in the queue now (what a new request would wait for), and their cost.
        self._outstanding = 0
        self._queued_items = 0
        self._queued_cost = 0
        # perf_counter() when the batch now running started; None while the model is idle
        self.running_since: float | None = None
        self._run_s: float | None = None  # running estimate of one model run's time
        self._run_cost = 0.0  # ... and of one run's cost (seconds per cost: their ratio)
        self._outstanding_cost = 0
        self._draining = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")

    @property
    def queued_items(self) -> int:
        """Items accepted and not yet run, whether their chunk is in the queue yet or not."""
        return self._outstanding

    def wait_estimate(self) -> float:
        """Seconds until a request queued now would start: what is left of the run in
        progress, then the chunks in the queue ahead in runs of max_batch_size (and
        max_run_cost), each as long as recent runs (later chunks of large requests queue
        behind it). Under load the runs are full, so this is close; after a quiet spell
        (small runs) it errs low, so a request is refused at once only when it surely must
        be."""
        if self._run_s is None:
            return 0.0
        runs = math.ceil(self._queued_items / self.max_batch_size)
        if self.max_run_cost:
            runs = max(runs, math.ceil(self._queued_cost / self.max_run_cost))
        wait = runs * self._run_s
        if self.running_since is not None:
            wait += max(self._run_s - (time.perf_counter() - self.running_since), 0.0)
        return wait

    def finish_estimate(self, cost: int) -> float:
        """Seconds until a request of several chunks costing `cost` would be done: its
        chunks take turns with the chunks of every request accepted before it, so at worst
        all of that work runs first, at the recent seconds per unit of cost."""
        if self._run_s is None or not self._run_cost:
            return 0.0
        return (self._outstanding_cost + cost) * self._run_s / self._run_cost

    async def submit(self, payload: Any, items: int, call: Call | None = None) -> Any:
        """Queue one request's prepared input (`items` rows) and await its result.

        A request of several chunks has one chunk in the queue at a time: the next joins
        the back of the queue when the last has run, so that concurrent large requests take
        turns and a small one waits for one chunk of each, not for all of them."""
        if self._outstanding + items > self.max_queue_items and self._outstanding:
            raise Overloaded(self.name, self._outstanding)
        if call is not None and self._queue:
            wait, left = self.wait_estimate(), call.deadline - time.perf_counter()
            if wait > left:
                raise Shed(self.name, wait, left)
        chunks = self._chunks(payload, items)
        cost = sum(c for _, _, c in chunks)
        if call is not None and len(chunks) > 1 and self._outstanding:
            # A large request that would start in time but finish late (504, its work
            # wasted) is refused now: the soak's bursts of 16 x 256 long texts got 504s.
            finish, left = self.finish_estimate(cost), call.deadline - time.perf_counter()
            if finish > left:
                raise Shed(self.name, finish, left, "this request and the work ahead would take")
        loop = asyncio.get_running_loop()
        pendings = [
            _Pending(part, n, c, loop.create_future(), call, first=i == 0)
            for i, (part, n, c) in enumerate(chunks)
        ]
        self._outstanding += items
        self._outstanding_cost += cost
        if call is not None:
            call.stage = "queued"
        try:
            results = []
            for p in pendings:
                self._enqueue(p, loop)
                results.append(await p.future)
        except BaseException:  # cancelled (client gone, deadline) or a chunk's run failed
            self._withdraw(pendings)
            raise
        if len(results) == 1:
            return results[0]
        assert self._join is not None
        return self._join(results)

    def _enqueue(self, pending: _Pending, loop: asyncio.AbstractEventLoop) -> None:
        self._queue.append(pending)
        pending.queued = True
        self._queued_items += pending.items
        self._queued_cost += pending.cost
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())

    def _chunks(self, payload: Any, items: int) -> list[tuple[Any, int, int]]:
        """(part, items, cost) of each chunk of one request: the whole when it fits in one
        run (or when results cannot be joined)."""
        if self._cost is None and items <= self.max_batch_size:
            return [(payload, items, items)]  # most requests: no list of costs to build
        costs = self._cost(payload) if self._cost is not None else [1] * items
        bounds = chunk_bounds(costs, self.max_batch_size, self.max_run_cost or items)
        if len(bounds) == 1 or self._join is None:
            return [(payload, items, sum(costs))]
        return [(payload[start:end], end - start, cost) for start, end, cost in bounds]

    def _withdraw(self, pendings: list[_Pending]) -> None:
        """Take a request's chunks that have not had their turn out of the queue."""
        for p in pendings:
            if not p.future.done():
                p.future.cancel()
            if not p.taken and not p.withdrawn:
                p.withdrawn = True
                p.payload = None  # its memory goes now, not when its turn would have come
                self._outstanding -= p.items
                self._outstanding_cost -= p.cost
                if p.queued:
                    self._queued_items -= p.items
                    self._queued_cost -= p.cost

    def _take_batch(self) -> list[_Pending]:
        """Whole chunks from the head of the queue, up to max_batch_size items and
        max_run_cost (at least one chunk), leaving out those withdrawn and refusing those
        past their deadline."""
        batch: list[_Pending] = []
        total = cost = 0
        now = time.perf_counter()
        while self._queue:
            head = self._queue[0]
            if head.withdrawn:
                self._queue.popleft()
                continue
            if batch and (
                not self.combine
                or total + head.items > self.max_batch_size
                or (self.max_run_cost and cost + head.cost > self.max_run_cost)
            ):
                break
            self._queue.popleft()
            head.taken = True
            self._outstanding -= head.items
            self._outstanding_cost -= head.cost
            self._queued_items -= head.items
            self._queued_cost -= head.cost
            call = head.call
            if call is not None and call.stage == "queued" and now > call.deadline:
                head.future.set_exception(
                    Shed(self.name, now - head.queued_at, call.deadline - now)
                )
                continue
            if call is not None:
                call.stage = "running"
            batch.append(head)
            total += head.items
            cost += head.cost
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                if self.max_wait_s > 0 and self._queued_items < self.max_batch_size:
                    await asyncio.sleep(self.max_wait_s)
                batch = self._take_batch()
                if not batch:
                    continue
                started = self.running_since = time.perf_counter()
                items = sum(p.items for p in batch)
                if self._on_wait is not None:
                    for p in batch:
                        if p.first:
                            self._on_wait(started - p.queued_at)
                try:
                    results = await loop.run_in_executor(
                        self._executor, self._run_batch, [p.payload for p in batch]
                    )
                except Exception as exc:  # noqa: BLE001 - hand the failure to each caller
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                finally:
                    self.running_since = None
                seconds = time.perf_counter() - started
                run_cost = sum(p.cost for p in batch)
                if self._run_s is None:
                    self._run_s, self._run_cost = seconds, run_cost
                else:
                    self._run_s = EWMA_WEIGHT * seconds + (1 - EWMA_WEIGHT) * self._run_s
                    self._run_cost = EWMA_WEIGHT * run_cost + (1 - EWMA_WEIGHT) * self._run_cost
                if self._on_batch is not None:
                    self._on_batch(items, seconds)
                for p, result in zip(batch, results, strict=True):
                    if not p.future.done():
                        p.future.set_result(result)
        finally:
            self._draining = False

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing running: a replaced version's batcher can close."""
        return not self._outstanding and self.running_since is None and not self._draining

    def stuck_for(self) -> float:
        """Seconds the batch now running has taken so far (0 while the model is idle)."""
        since = self.running_since
        return 0.0 if since is None else time.perf_counter() - since

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
