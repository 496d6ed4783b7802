"""Where the gateway starts a worker on demand: the node's memory model decides (a spawn that would not fit is
refused with the numbers), a refusal sends the gateway to the next pool, and when every pool refuses, the model
is split with llama.cpp RPC; with nowhere left, the 503 says what each pool needs and has."""

from __future__ import annotations

import asyncio
import contextlib
import glob
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psutil
import pytest

from rbee_tui.capacity import ENGINE_EMBEDDED, MemoryPrediction, default_ctx, predict_worker
from rbee_tui.cluster.layers import read_shape
from rbee_tui.cluster.planner import MiB, NodeFree, Placement, plan
from rbee_tui.config import DEFAULT_CLUSTER_CTX, PoolConfig
from rbee_tui.gateway.events import GatewayEvent, WorkerStarted, WorkerStopped
from rbee_tui.hive.setup import build_cache
from rbee_tui.pools.client import CONNECTED, PoolClient
from rbee_tui.tinymodel import TinySpec, write_model
from tests.e2e.test_gateway import ASK, api, gateway, live
from tests.support.hub import HubServer
from tests.support.site import Site
from tests.support.sshd import sshd_available
from tests.support.waiting import until

pytestmark = pytest.mark.skipif(sshd_available() is not None, reason=str(sshd_available()))
RPC_BUILT = bool(glob.glob(str(build_cache() / "*" / "bin" / "ggml-rpc-server")))
NOTHING_FITS = 1 << 20  # a memory_budget of 1 MiB: every worker is refused
SPLIT = "split-big"
# Weights (171 MB of f16) well above a node's fixed part (its rpc-server and compute buffer, the coordinator's
# more): one worker of it needs more than either pool's share of a split over two.
SPLIT_SPEC = TinySpec(
    name="rbee split-big", n_embd=768, n_layer=12, n_head=12, n_head_kv=12, n_ff=2048, n_ctx=1024, seed=1, f16=True
)
MARGIN = 10 * MiB  # the budget's distance from the single worker above it and the largest share below it


@pytest.fixture
def site(tmp_path: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / "cache"))  # the local node's tensor cache
    s = Site(tmp_path, hub)
    yield s
    s.stop()


@contextlib.asynccontextmanager
async def pools(*configs: PoolConfig) -> AsyncIterator[dict[str, PoolClient]]:
    out = {p.name: PoolClient(p, sample_interval=0.5, keepalive_interval=1, max_backoff=1) for p in configs}
    for c in out.values():
        c.start()
    try:
        await asyncio.gather(*(c.wait_connected(30) for c in out.values()))
        yield out
    finally:
        for c in out.values():
            with contextlib.suppress(Exception):
                if c.view.state == CONNECTED:
                    for w in await c.workers():
                        await c.stop_worker(w["id"])
        await asyncio.gather(*(c.close() for c in out.values()))


async def test_a_pool_where_it_does_not_fit_is_passed_over(site: Site) -> None:
    tight = PoolConfig(name="local", transport="local", memory_budget=NOTHING_FITS)
    async with pools(tight, site.pools["pool-a"]) as clients, gateway(clients) as gw:
        raw = await api(gw).completions.with_raw_response.create(model="tiny-test", prompt="Hi", max_tokens=3)
        assert raw.headers["x-rbee-pool"] == "pool-a"
        assert live(clients["local"]) == []
        assert gw.ondemand.starts["tiny-test"].outcome.endswith(" on pool-a")


async def test_with_one_pool_that_refuses_the_503_says_what_it_needs_and_has() -> None:
    tight = PoolConfig(name="local", transport="local", memory_budget=NOTHING_FITS)
    async with pools(tight) as clients, gateway(clients) as gw:
        with pytest.raises(openai.InternalServerError) as refused:
            await api(gw).chat.completions.create(model="tiny-test", messages=ASK, max_tokens=3)
        message = refused.value.message
        assert refused.value.status_code == 503 and "- cannot start tiny-test: pool local: tiny-test needs " in message
        assert "needs " in message and " free on local" in message and "memory_budget" in message
        assert "no split over several pools: only one pool is connected" in message
        assert live(clients["local"]) == []


@dataclass(frozen=True)
class Sizing:
    """The split model against a memory_budget, as the code sizes it: one worker of it on a pool (what the node
    predicts for a spawn) and its placement over two pools with that budget (what the cluster planner makes)."""

    single: MemoryPrediction
    budget: int
    placement: Placement

    @property
    def largest_share(self) -> int:
        return max(s.total_bytes for s in self.placement.shares)


def sizing(path: Path) -> Sizing:
    """A budget halfway between the largest node's share of the split and the single worker."""
    shape = read_shape(path)
    # As the node predicts a spawn from the gateway: the embedded engine, at the model's own context.
    single = predict_worker(shape, default_ctx(shape.n_ctx_train), "cpu", 1, ENGINE_EMBEDDED)
    available = psutil.virtual_memory().available

    def split(budget: int) -> Placement:
        # As the gateway's cluster sees two pools with this memory_budget and no worker yet (Cluster._node).
        nodes = [NodeFree(name, available, limit_bytes=budget) for name in ("local", "pool-a")]
        return plan(shape, nodes, DEFAULT_CLUSTER_CTX)

    largest = max(s.total_bytes for s in split(single.total - 1).shares)
    budget = (single.total + largest) // 2
    return Sizing(single, budget, split(budget))


@pytest.fixture(scope="session")
def split_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose weights dominate the fixed cost of a node (about 170 MB of f16 weights): split over two
    pools, each holds less than one worker of it would."""
    return write_model(tmp_path_factory.mktemp("split-model") / f"{SPLIT}.gguf", SPLIT_SPEC)


async def download(client: PoolClient, model: str, repo: str, file: str) -> dict[str, Any]:
    """Register `model` on the pool, download it there from the hub stand-in; its catalog entry."""
    await client.hive("models", "register", model, "--repo", repo, "--file", file)
    events = [e async for e in client.hive_stream("models", "download", model)]
    assert events[-1]["event"] == "done", events[-1]
    catalog = await client.hive("models", "catalog")
    return next(m for m in catalog["models"] if m["id"] == model)


@pytest.mark.skipif(not RPC_BUILT, reason="ggml-rpc-server is not built: run scripts/build-llama-cpp.sh")
async def test_when_no_single_pool_takes_it_the_model_is_split_and_stopped_when_idle(
    site: Site, hub: HubServer, split_model: Path
) -> None:
    size = sizing(split_model)
    # One worker of it fits neither pool; each pool's share of the split fits, both by a margin.
    assert size.single.total - size.budget >= MARGIN, (size.single.describe(), size.budget)
    assert size.budget - size.largest_share >= MARGIN, (size.placement.describe(), size.budget)
    assert len(size.placement.shares) == 2
    configs = (
        PoolConfig(name="local", transport="local", memory_budget=size.budget),
        replace(site.pools["pool-a"], memory_budget=size.budget),
    )
    repo = f"rbee-test/{SPLIT}-GGUF"
    hub.add(repo, split_model.name, path=split_model)
    events: list[GatewayEvent] = []
    async with pools(*configs) as clients:
        entries = await asyncio.gather(*(download(c, SPLIT, repo, split_model.name) for c in clients.values()))
        # Every pool holds it, and predicts for a worker of it what `sizing` does: more than its budget.
        assert [e["memory"]["total"] for e in entries] == [size.single.total] * 2
        async with gateway(clients, events, idle_stop=3.0) as gw:
            raw = await api(gw).chat.completions.with_raw_response.create(
                model=SPLIT, messages=ASK, max_tokens=4, temperature=0, stream=True
            )
            assert raw.http_response.status_code == 200  # not the 503 of a model that fits nowhere
            chunks = [c async for c in raw.parse()]
            assert [c for c in chunks if c.choices]  # answered by the cluster's coordinator, through its front
            head = raw.headers["x-rbee-pool"]
            [coordinator] = [w for c in clients.values() for w in live(c)]  # no single worker anywhere
            assert coordinator["kind"] == "cluster" and raw.headers["x-rbee-worker"] == coordinator["id"]
            assert head in clients and coordinator in live(clients[head])
            [started] = [e for e in events if isinstance(e, WorkerStarted)]
            assert started.where.startswith(f"a cluster over {head}, ")
            async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/state") as r:
                state = await r.json()
            [cluster] = state["clusters"]
            assert cluster["model"] == SPLIT and cluster["started_by_gateway"] and cluster["state"] == "ready"
            # Over both pools, each holding the share the planner gives it under the budget.
            nodes = cluster["nodes"]
            assert [n["pool"] for n in nodes] == [head, *(p for p in clients if p != head)]
            assert [n["memory_bytes"] for n in nodes] == [s.total_bytes for s in size.placement.shares]
            assert [n["layers"] for n in nodes] == [[s.first_layer, s.stop_layer - 1] for s in size.placement.shares]
            assert all(n["memory_bytes"] <= size.budget < size.single.total for n in nodes)
            await until(lambda: any(isinstance(e, WorkerStopped) for e in events), 60, "the idle cluster to stop")
            assert all(live(c) == [] for c in clients.values())
            assert gw.state()["clusters"][0]["state"] == "stopped"
