"""The adaptive batcher with a real (numpy) batch function: grouping, splitting, limits,
bounded runs, withdrawn requests and deadlines."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batching import AdaptiveBatcher, Call, Overloaded, Shed


def make(max_batch: int = 64, max_queue: int = 1000, join=None):
    sizes: list[int] = []
    gate = threading.Event()

    def run_batch(parts: list[np.ndarray]) -> list[np.ndarray]:
        gate.wait(5)  # hold the first batch so that others queue up behind it
        if any((p < 0).any() for p in parts):
            raise RuntimeError("model exploded")
        sizes.append(sum(len(p) for p in parts))
        out = np.concatenate(parts) * 2
        return np.split(out, np.cumsum([len(p) for p in parts])[:-1])

    b = AdaptiveBatcher(
        "t",
        run_batch,
        max_batch_size=max_batch,
        max_queue_items=max_queue,
        join=join,
        on_batch=lambda n, s: None,
    )
    return b, sizes, gate


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows() -> None:
    async def main() -> None:
        b, sizes, gate = make(max_batch=8)
        reqs = [np.full((i % 3 + 1, 2), i, dtype=np.float32) for i in range(12)]
        tasks = [asyncio.create_task(b.submit(r, len(r))) for r in reqs]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(*tasks)
        for r, out in zip(reqs, results, strict=True):
            assert np.array_equal(out, r * 2)
        assert sum(sizes) == sum(len(r) for r in reqs)
        assert max(sizes) <= 8 and len(sizes) < len(reqs)  # grouped, within the limit
        b.close()

    asyncio.run(main())


def test_full_queue_raises_overloaded_and_others_still_finish() -> None:
    async def main() -> None:
        b, _, gate = make(max_queue=4)
        first = asyncio.create_task(b.submit(np.zeros((4, 2)), 4))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(b.submit(np.zeros((4, 2)), 4))  # queued behind
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="at capacity"):
            await b.submit(np.zeros((1, 2)), 1)
        gate.set()
        assert (await first).shape == (4, 2) and (await second).shape == (4, 2)
        b.close()

    asyncio.run(main())


def test_a_failing_batch_fails_its_own_callers_and_no_others() -> None:
    async def main() -> None:
        b, sizes, gate = make()
        # The bad request runs alone in the first batch; the next two queue up behind it
        # and run together in the second.
        bad = asyncio.create_task(b.submit(np.full((1, 2), -1.0), 1))
        await asyncio.sleep(0.01)
        good = [asyncio.create_task(b.submit(np.full((1, 2), float(i)), 1)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        gate.set()
        with pytest.raises(RuntimeError, match="model exploded"):
            await bad
        assert [(await g).tolist() for g in good] == [[[2.0, 2.0]], [[4.0, 4.0]]]
        assert sizes == [2]
        b.close()

    asyncio.run(main())


def test_close_stops_the_inference_thread() -> None:
    async def main() -> None:
        b, _, gate = make()
        gate.set()
        await b.submit(np.zeros((1, 2)), 1)
        b.close()
        with pytest.raises(RuntimeError, match="shutdown"):
            await b.submit(np.zeros((1, 2)), 1)

    asyncio.run(main())


def test_a_request_larger_than_a_batch_runs_in_bounded_chunks_in_order() -> None:
    async def main() -> None:
        b, sizes, gate = make(max_batch=8, join=np.concatenate)  # as a runner's join does
        gate.set()
        big = np.arange(21 * 2, dtype=np.float32).reshape(21, 2)
        out = await b.submit(big, 21)
        assert np.array_equal(out, big * 2)
        assert sizes == [8, 8, 5]  # no run over max_batch_size
        b.close()

    asyncio.run(main())


def test_a_cancelled_request_is_withdrawn_and_never_runs() -> None:
    async def main() -> None:
        b, sizes, gate = make(max_batch=8, join=np.concatenate)  # as a runner's join does
        first = asyncio.create_task(b.submit(np.zeros((8, 2)), 8))  # runs, held by the gate
        await asyncio.sleep(0.01)
        call = Call(deadline=time.perf_counter() + 60)
        gone = asyncio.create_task(b.submit(np.ones((20, 2)), 20, call))  # 3 chunks, queued
        await asyncio.sleep(0.01)
        assert b.queued_items == 20 and call.stage == "queued"
        gone.cancel()
        await asyncio.sleep(0.01)
        assert b.queued_items == 0  # out of the queue at once, not when its turn comes
        after = asyncio.create_task(b.submit(np.full((3, 2), 5.0), 3))
        await asyncio.sleep(0.01)
        gate.set()
        assert (await first).shape == (8, 2)
        assert np.array_equal(await after, np.full((3, 2), 10.0))
        assert sizes == [8, 3]  # none of the 20 withdrawn rows ran
        with pytest.raises(asyncio.CancelledError):
            await gone
        b.close()

    asyncio.run(main())


def test_a_request_whose_deadline_passes_in_the_queue_is_shed_not_run() -> None:
    async def main() -> None:
        b, sizes, gate = make(max_batch=8)
        first = asyncio.create_task(b.submit(np.zeros((8, 2)), 8))
        await asyncio.sleep(0.01)
        call = Call(deadline=time.perf_counter() + 0.05)
        late = asyncio.create_task(b.submit(np.ones((2, 2)), 2, call))
        await asyncio.sleep(0.1)  # the deadline passes while the first batch holds the model
        gate.set()
        await first
        with pytest.raises(Shed, match="refused now rather than answered late"):
            await late
        assert sizes == [8] and call.stage == "queued"
        b.close()

    asyncio.run(main())


@pytest.mark.exclusive  # a 0.1 s bound
def test_a_request_that_cannot_start_in_time_is_shed_at_once() -> None:
    async def main() -> None:
        b, sizes, gate = make(max_batch=4)
        gate.set()
        await b.submit(np.zeros((4, 2)), 4)  # one run, to learn how long a run takes
        b._run_s = 1.0  # as if each run took a second
        gate.clear()
        held = [asyncio.create_task(b.submit(np.zeros((4, 2)), 4)) for _ in range(3)]
        await asyncio.sleep(0.01)  # one run in progress, two queued: about 3 s ahead
        started = time.perf_counter()
        with pytest.raises(Shed) as refused:
            await b.submit(np.zeros((1, 2)), 1, Call(deadline=started + 0.5))
        assert time.perf_counter() - started < 0.1  # at once, not after the wait
        assert refused.value.retry_after_s >= 2
        # A request with time enough is queued as usual.
        ok = asyncio.create_task(b.submit(np.zeros((1, 2)), 1, Call(deadline=started + 30)))
        gate.set()
        await asyncio.gather(*held)
        assert (await ok).shape == (1, 2)
        b.close()

    asyncio.run(main())


def test_runs_are_bounded_by_the_runners_cost_too() -> None:
    """Items that cost more (the LSTM's long texts) run fewer to a run, whole requests and
    chunks alike; a single item over the budget runs alone."""

    async def main() -> None:
        sizes: list[int] = []

        def run_batch(parts: list[list[int]]) -> list[list[int]]:
            sizes.append(sum(len(p) for p in parts))
            return [[2 * x for x in p] for p in parts]

        b = AdaptiveBatcher(
            "t",
            run_batch,
            max_batch_size=8,
            max_queue_items=1000,
            join=lambda rs: [x for r in rs for x in r],
            cost=lambda part: part,
            max_run_cost=10,
        )
        long = [5] * 6  # six items costing 5: two to a run
        assert await b.submit(long, 6) == [10] * 6
        assert sizes == [2, 2, 2]
        sizes.clear()
        short = [1] * 12  # twelve costing 1: bounded by items (8), then cost
        assert await b.submit(short, 12) == [2] * 12
        assert sizes == [8, 4]
        sizes.clear()
        assert await b.submit([30, 1], 2) == [60, 2]  # 30 alone is over the budget
        assert sizes == [1, 1]
        b.close()

    asyncio.run(main())


def test_a_small_request_waits_for_one_chunk_of_a_large_one_not_all() -> None:
    async def main() -> None:
        b, sizes, gate = make(max_batch=4, join=np.concatenate)
        large = asyncio.create_task(b.submit(np.ones((12, 2)), 12))  # three chunks of 4
        await asyncio.sleep(0.01)  # its first chunk runs, held by the gate
        small = asyncio.create_task(b.submit(np.full((1, 2), 3.0), 1))
        await asyncio.sleep(0.01)
        assert b.queued_items == 8 + 1  # the large one's later chunks still count
        gate.set()
        assert np.array_equal(await small, np.full((1, 2), 6.0))
        assert not large.done()
        assert np.array_equal(await large, np.full((12, 2), 2.0))
        assert sizes == [4, 1, 4, 4]  # the small request ran after one chunk, not three
        b.close()

    asyncio.run(main())


def test_a_large_request_that_would_finish_late_is_shed_at_once() -> None:
    """Its chunks take turns with the work accepted before it: when all of that would not be
    done by its deadline, 503 now, not 504 later; a small request still gets in."""

    async def main() -> None:
        b, sizes, gate = make(max_batch=4, join=np.concatenate)
        gate.set()
        await b.submit(np.zeros((4, 2)), 4)  # one run, to learn how long a run takes
        b._run_s, b._run_cost = 1.0, 4.0  # as if a run of 4 items took a second
        gate.clear()
        ahead = asyncio.create_task(b.submit(np.zeros((12, 2)), 12))  # 3 s of work
        await asyncio.sleep(0.01)
        now = time.perf_counter()
        with pytest.raises(Shed, match="this request and the work ahead would take"):
            await b.submit(np.zeros((8, 2)), 8, Call(deadline=now + 2))
        assert b.queued_items == 8  # the refused request left nothing behind
        small = asyncio.create_task(b.submit(np.zeros((1, 2)), 1, Call(deadline=now + 2)))
        gate.set()
        await ahead
        assert (await small).shape == (1, 2)
        b.close()

    asyncio.run(main())
