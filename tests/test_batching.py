"""The adaptive batcher with a real (numpy) batch function: grouping, splitting, limits."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.batching import AdaptiveBatcher, Overloaded


def make(max_batch: int = 64, max_queue: int = 1000):
    sizes: list[int] = []
    gate = threading.Event()

    def run_batch(parts: list[np.ndarray]) -> list[np.ndarray]:
        gate.wait(5)  # hold the first batch so that others queue up behind it
        if any((p < 0).any() for p in parts):
            raise RuntimeError("model exploded")
        sizes.append(sum(len(p) for p in parts))
        out = np.concatenate(parts) * 2
        return np.split(out, np.cumsum([len(p) for p in parts])[:-1])

    b = AdaptiveBatcher("t", run_batch, max_batch_size=max_batch, max_queue_items=max_queue,
                        on_batch=lambda n, s: None)
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
