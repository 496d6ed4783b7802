"""The queue of a llama-server worker: arrival order, one at a time, cancels and clients that leave."""

from __future__ import annotations

import asyncio

import pytest

from rbee_tui.worker.proxy_jobs import Queue
from rbee_tui.worker.requests import BadRequest


async def test_jobs_run_one_at_a_time_in_the_order_they_wait() -> None:
    queue = Queue()
    jobs = [queue.add(f"j{i}") for i in range(4)]
    assert await queue.turn(jobs[0])  # nobody runs: at once
    waits = []
    for job in (jobs[3], jobs[1], jobs[2]):
        waits.append((job, asyncio.ensure_future(queue.turn(job))))
        await asyncio.sleep(0)
    assert len(queue) == 4 and not any(w.done() for _, w in waits)
    queue.done(jobs[0])
    for job, wait in waits:
        assert await wait and queue.running is job
        queue.done(job)
    assert len(queue) == 0 and queue.jobs == {}
    assert [j.started_seq for j in jobs] == [1, 3, 4, 2] and [j.arrival_seq for j in jobs] == [1, 2, 3, 4]
    queue.add("x")
    with pytest.raises(BadRequest, match="already queued"):
        queue.add("x")


async def test_a_cancelled_waiting_job_leaves_at_once() -> None:
    queue = Queue()
    first, second, third = queue.add("a"), queue.add("b"), queue.add("c")
    assert await queue.turn(first)
    waiting = asyncio.ensure_future(queue.turn(second))
    after = asyncio.ensure_future(queue.turn(third))
    await asyncio.sleep(0)
    queue.cancel(second)
    assert await waiting is False and second.cancel.is_set() and len(queue) == 2
    queue.done(second)
    queue.cancel(first)  # running: told to stop, keeps its turn until it is done
    assert first.cancel.is_set() and queue.running is first and not after.done()
    queue.done(first)
    assert await after is True and queue.running is third


async def test_a_client_that_leaves_gives_up_its_place() -> None:
    queue = Queue()
    first, second, third = queue.add("a"), queue.add("b"), queue.add("c")
    assert await queue.turn(first)
    leaving = asyncio.ensure_future(queue.turn(second))
    staying = asyncio.ensure_future(queue.turn(third))
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    queue.done(second)
    queue.done(first)
    assert await staying is True and queue.running is third and len(queue) == 1


async def test_a_worker_with_slots_runs_that_many_at_once_and_the_rest_in_order() -> None:
    queue = Queue(slots=2)  # llama-server --parallel 2: two requests batched, the third waits for a slot
    a, b, c, d = (queue.add(n) for n in "abcd")
    assert await queue.turn(a) and await queue.turn(b)
    waits = [asyncio.ensure_future(queue.turn(j)) for j in (c, d)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waits) and len(queue) == 4
    queue.done(b)  # one slot frees: the first waiting job takes it, the other still waits
    assert await waits[0] and not waits[1].done()
    assert {j.state for j in (a, c)} == {"running"} and d.state == "queued"
    queue.done(a)
    assert await waits[1] and [j.started_seq for j in (a, b, c, d)] == [1, 2, 3, 4]
