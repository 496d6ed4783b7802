"""The routing table follows what the pools report and picks the least loaded worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from rbee_tui.gateway.routes import RoutingTable
from rbee_tui.pools.client import StateChanged, WorkersListed


def worker(wid: str, model: str, state: str = "ready", started: float = 1.0, port: int = 8000) -> dict[str, Any]:
    return {"id": wid, "model": model, "state": state, "started_at": started, "port": port, "engine": "embedded"}


@pytest.fixture
async def table() -> AsyncIterator[RoutingTable]:
    async with aiohttp.ClientSession() as session:
        yield RoutingTable(dict, session)


async def test_the_least_loaded_ready_worker_of_the_model_is_picked(table: RoutingTable) -> None:
    table.hear(WorkersListed("a", (worker("w0", "m"), worker("w1", "m", port=8001), worker("w2", "other"))))
    table.hear(WorkersListed("b", (worker("w0", "m", state="loading"),)))
    first = table.pick("m")
    second = table.pick("m")
    assert first is not None and second is not None
    assert {first.worker_id, second.worker_id} == {"w0", "w1"}, "equally loaded: they take turns"
    assert first.pool == second.pool == "a", "a loading worker takes nothing"
    table.release(first)
    third = table.pick("m")
    assert third is first and (first.in_flight, second.in_flight) == (1, 1)
    second.others = 3  # other clients queue there too
    table.release(third)
    assert table.pick("m") is first
    assert table.pick("nothing") is None


async def test_a_broken_worker_takes_nothing_and_a_lost_pool_leaves(table: RoutingTable) -> None:
    table.hear(WorkersListed("a", (worker("w0", "m"),)))
    table.hear(WorkersListed("b", (worker("w0", "m"),)))
    [a] = [r for r in table.routes.values() if r.pool == "a"]
    table.mark_broken(a, "it died")
    assert [r.pool for r in table.candidates("m")] == ["b"]
    table.hear(StateChanged("b", "lost", "connection closed"))
    assert [r.pool for r in table.routes.values()] == ["a"]
    assert table.pick("m") is None


async def test_the_pools_list_is_the_truth(table: RoutingTable) -> None:
    table.hear(WorkersListed("a", (worker("w0", "m"), worker("w1", "m"))))
    table.hear(WorkersListed("a", (worker("w0", "m", state="exited"), worker("w1", "m", state="busy"))))
    assert [(r.worker_id, r.routable) for r in table.routes.values()] == [("w1", True)]
    # The same id, started again: another worker, another route.
    table.hear(WorkersListed("a", (worker("w1", "m", started=2.0, state="loading"),)))
    [route] = table.routes.values()
    assert route.started_at == 2.0 and not route.routable
