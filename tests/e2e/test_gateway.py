"""The gateway against real pools (the local one and an sshd pool on loopback) and real workers, driven by the
official `openai` client: listing, chats and completions, streams, routing by model and by load, workers
started on demand and stopped when idle, and workers or pools that die under a request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from rbee_tui.config import GatewayConfig, PoolConfig
from rbee_tui.errors import RbeeError
from rbee_tui.gateway.events import GatewayEvent, WorkerLost, WorkerStarted, WorkerStopped
from rbee_tui.gateway.service import Gateway
from rbee_tui.pools.client import CONNECTED, PoolClient
from rbee_tui.tinymodel import TINY_TOOLS, TinySpec, write_model
from rbee_tui.worker.upstream import find_llama_server
from tests.support.hub import HubServer
from tests.support.site import Site
from tests.support.sshd import sshd_available
from tests.support.waiting import until

pytestmark = pytest.mark.skipif(sshd_available() is not None, reason=str(sshd_available()))

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
# A greedy generation of it never ends by itself, and 4000 tokens of it take many seconds on a CPU: long enough
# to kill its worker, or leave, while it runs.
ENDLESS = TinySpec(
    name="rbee endless", n_embd=256, n_layer=4, n_head=4, n_head_kv=4, n_ff=768, n_ctx=4096, endless=True, seed=5
)


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("gateway-models")
    return {
        "tiny-tools": write_model(where / "tiny-tools.gguf", TINY_TOOLS),
        "tiny-endless": write_model(where / "tiny-endless.gguf", ENDLESS),
    }


@pytest.fixture
def site(tmp_path: Path, hub: HubServer) -> Iterator[Site]:
    s = Site(tmp_path, hub)
    yield s
    s.stop()


@pytest.fixture
async def clients(site: Site) -> AsyncIterator[dict[str, PoolClient]]:
    """The local pool and pool-a (over SSH), connected."""
    pools = {"local": PoolConfig(name="local", transport="local"), "pool-a": site.pools["pool-a"]}
    out = {
        name: PoolClient(pool, sample_interval=0.5, keepalive_interval=1, keepalive_count_max=3, max_backoff=1)
        for name, pool in pools.items()
    }
    for c in out.values():
        c.start()
    await asyncio.gather(*(c.wait_connected(30) for c in out.values()))
    yield out
    for c in out.values():
        with contextlib.suppress(Exception):
            if c.view.state == CONNECTED:
                for w in await c.workers():
                    await c.stop_worker(w["id"])
    await asyncio.gather(*(c.close() for c in out.values()))


async def provide(client: PoolClient, hub: HubServer, files: dict[str, Path], model: str) -> None:
    """Register `model` on the pool and download it there from the hub stand-in."""
    hub.add(f"rbee-test/{model}-GGUF", files[model].name, data=files[model].read_bytes())
    await client.hive("models", "register", model, "--repo", f"rbee-test/{model}-GGUF", "--file", files[model].name)
    events = [e async for e in client.hive_stream("models", "download", model)]
    assert events[-1]["event"] == "done", events[-1]


@contextlib.asynccontextmanager
async def gateway(
    clients: dict[str, PoolClient], events: list[GatewayEvent] | None = None, **options: Any
) -> AsyncIterator[Gateway]:
    config = GatewayConfig(**{"listen": "127.0.0.1:0", "start_timeout": 120.0, **options})
    gw = Gateway(lambda: clients, config, notify=(events if events is not None else []).append)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.close()


def api(gw: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120)


def live(client: PoolClient) -> list[dict[str, Any]]:
    return [w for w in client.view.workers if w["state"] != "exited"]


async def queue(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/health") as resp:
        return int((await resp.json())["queue"])


async def test_the_openai_client_reaches_two_models_each_on_its_own_pool(
    clients: dict[str, PoolClient], hub: HubServer, model_files: dict[str, Path]
) -> None:
    await provide(clients["pool-a"], hub, model_files, "tiny-tools")
    local = await clients["local"].spawn_worker("cpu", "tiny-test")
    await clients["pool-a"].spawn_worker("cpu", "tiny-tools")
    async with gateway(clients) as gw:
        ready = {"tiny-test", "tiny-tools"}
        await until(lambda: {r.model for r in gw.table.routes.values() if r.routable} >= ready, 30, "both routable")
        oa = api(gw)
        assert ready <= {m.id for m in (await oa.models.list()).data}
        assert (await oa.models.retrieve("tiny-tools")).id == "tiny-tools"

        # A chat, whole: from the local pool's worker, the very answer that worker gives itself.
        ask = {"model": "tiny-test", "messages": ASK, "max_tokens": 8, "temperature": 0, "seed": 1}
        raw = await oa.chat.completions.with_raw_response.create(**ask)
        assert (raw.headers["x-rbee-pool"], raw.headers["x-rbee-worker"]) == ("local", local["id"])
        chat = raw.parse()
        async with aiohttp.ClientSession() as s, s.post(f"{local['client_url']}/v1/chat/completions", json=ask) as r:
            direct = await r.json()
        assert chat.choices[0].message.content == direct["choices"][0]["message"]["content"]
        assert chat.usage is not None and chat.usage.completion_tokens == direct["usage"]["completion_tokens"]

        # The same chat streamed, with its usage: the same text, token by token.
        stream = await oa.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

        # A completion of the other model goes to pool-a, through its tunnel; streamed and whole agree.
        ask = {"model": "tiny-tools", "prompt": "Hello", "max_tokens": 12, "temperature": 0, "seed": 3}
        raw_stream = await oa.completions.with_raw_response.create(**ask, stream=True)
        assert raw_stream.headers["x-rbee-pool"] == "pool-a"
        streamed = "".join([c.choices[0].text async for c in raw_stream.parse() if c.choices])
        whole = await oa.completions.create(**ask)
        assert streamed == whole.choices[0].text and whole.model == "tiny-tools"

        # Tools pass through untouched: the worker's grammar makes the call.
        call = await oa.chat.completions.create(
            model="tiny-tools", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=64, seed=2
        )
        calls = call.choices[0].message.tool_calls or []
        assert calls and calls[0].function.name == "get_weather"
        assert json.loads(calls[0].function.arguments)["city"] in ("Paris", "Rome")

        async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/state") as r:
            state = await r.json()
        assert {p["name"]: p["state"] for p in state["pools"]} == {"local": "connected", "pool-a": "connected"}
        by_model = {w["model"]: w for w in state["workers"]}
        assert by_model["tiny-test"]["pool"] == "local" and by_model["tiny-tools"]["pool"] == "pool-a"
        assert by_model["tiny-tools"]["served"] >= 3 and not by_model["tiny-tools"]["started_by_gateway"]
        assert state["gateway"]["requests"] == 5 and state["starts"] == [], "both were up: nothing started"


async def test_a_bad_request_is_refused_as_a_worker_would_and_starts_nothing(clients: dict[str, PoolClient]) -> None:
    async with gateway(clients) as gw:
        oa = api(gw)
        with pytest.raises(openai.BadRequestError) as bad:
            await oa.chat.completions.create(model="tiny-test", messages=ASK, extra_body={"colour": "blue"})
        assert "unknown parameter 'colour'" in bad.value.message
        with pytest.raises(openai.BadRequestError) as bad:
            await oa.chat.completions.create(model="tiny-test", messages=ASK, temperature=9)
        assert "temperature must be between 0.0 and 5.0, got 9" in bad.value.message
        with pytest.raises(openai.BadRequestError) as bad:
            await oa.completions.create(model="tiny-test", prompt="Hi", stream_options={"include_usage": True})
        assert "stream_options is only allowed when stream is true" in bad.value.message
        with pytest.raises(openai.NotFoundError) as missing:
            await oa.chat.completions.create(model="no-such-model", messages=ASK)
        assert "no-such-model" in missing.value.message and "tiny-test" in missing.value.message
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{gw.url}/v1/completions", data=b"{nope") as r:
                assert r.status == 400 and "the body is not valid JSON" in (await r.json())["error"]["message"]
            async with s.post(f"{gw.url}/v1/completions", json={"prompt": "Hi"}) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "model"
            async with s.get(f"{gw.url}/v1/embeddings") as r:  # not served: an OpenAI error that says what is
                assert r.status == 404 and "/v1/chat/completions" in (await r.json())["error"]["message"]
            async with s.get(f"{gw.url}/v1/completions") as r:
                assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
        assert gw.ondemand.starts == {} and all(live(c) == [] for c in clients.values())


async def test_a_model_with_no_worker_gets_one_where_it_is_and_loses_it_when_idle(
    clients: dict[str, PoolClient], hub: HubServer, model_files: dict[str, Path]
) -> None:
    await provide(clients["pool-a"], hub, model_files, "tiny-tools")  # there only
    events: list[GatewayEvent] = []
    async with gateway(clients, events, idle_stop=2.0) as gw:
        oa = api(gw)
        ask = {"model": "tiny-tools", "messages": ASK, "max_tokens": 6, "temperature": 0, "seed": 4}
        # Two requests arrive before any worker is up: one start serves both.
        first, second = await asyncio.gather(
            oa.chat.completions.with_raw_response.create(**ask),
            oa.chat.completions.with_raw_response.create(**ask, stream=True),
        )
        assert first.headers["x-rbee-pool"] == second.headers["x-rbee-pool"] == "pool-a"
        assert first.headers["x-rbee-worker"] == second.headers["x-rbee-worker"]
        text = "".join([c.choices[0].delta.content or "" async for c in second.parse() if c.choices])
        assert text == first.parse().choices[0].message.content
        started = [e for e in events if isinstance(e, WorkerStarted)]
        assert [(e.model, e.where) for e in started] == [("tiny-tools", f"{first.headers['x-rbee-worker']} on pool-a")]
        assert [w["model"] for w in live(clients["pool-a"])] == ["tiny-tools"] and live(clients["local"]) == []
        [mine] = [w for w in gw.state()["workers"] if w["model"] == "tiny-tools"]
        assert mine["started_by_gateway"]

        # Nobody asks for it any more: it is stopped after idle_stop, and its memory comes back.
        await until(lambda: any(isinstance(e, WorkerStopped) for e in events), 30, "the idle worker to be stopped")
        assert [w for w in await clients["pool-a"].workers() if w["state"] != "exited"] == []
        assert not any(r.model == "tiny-tools" for r in gw.table.routes.values())

        # A model no pool can run: 503, with what each pool said.
        await clients["local"].hive("models", "register", "ghost", "--repo", "rbee-test/ghost", "--file", "g.gguf")
        with pytest.raises(openai.InternalServerError) as refused:
            await oa.chat.completions.create(model="ghost", messages=ASK)
        assert refused.value.status_code == 503
        assert "pool local: ghost is not downloaded there" in refused.value.message
        assert "pool pool-a: ghost is not in its catalog" in refused.value.message


async def test_the_least_loaded_worker_takes_the_next_request_and_a_client_that_leaves_cancels_its_job(
    clients: dict[str, PoolClient], hub: HubServer, model_files: dict[str, Path]
) -> None:
    for name in clients:
        await provide(clients[name], hub, model_files, "tiny-endless")
    workers = await asyncio.gather(*(c.spawn_worker("cpu", "tiny-endless") for c in clients.values()))
    urls = {w["id"] + "@" + p: w["client_url"] for p, w in zip(clients, workers, strict=True)}
    async with gateway(clients) as gw:
        await until(lambda: len(gw.table.candidates("tiny-endless")) == 2, 30, "both workers routable")
        body = {"model": "tiny-endless", "prompt": "Hello", "max_tokens": 4000, "temperature": 0, "stream": True}
        async with aiohttp.ClientSession() as s:
            one = await s.post(f"{gw.url}/v1/completions", json=body)
            await one.content.readline()  # its worker generates
            two = await s.post(f"{gw.url}/v1/completions", json=body)
            await two.content.readline()
            taken = {f"{r.headers['X-Rbee-Worker']}@{r.headers['X-Rbee-Pool']}" for r in (one, two)}
            assert taken == set(urls), "the second request went to the idle worker, not behind the first"
            assert await asyncio.gather(*(queue(u) for u in urls.values())) == [1, 1]
            assert {w["queue"] for w in gw.state()["workers"]} == {1}
            one.close()  # both clients go away mid-answer
            two.close()
        # Each job stops on its worker long before its 4000 tokens could have been written.
        await until_async(lambda: all_idle(list(urls.values())), 10, "both jobs to be cancelled")
        await until(lambda: gw.in_flight() == 0, 5, "the gateway's leases to end")


@pytest.mark.parametrize("engine", ["llama-cpp-python", "llama-server"])
async def test_a_client_that_leaves_a_whole_answer_cancels_its_job(
    clients: dict[str, PoolClient], hub: HubServer, model_files: dict[str, Path], engine: str
) -> None:
    """No stream to notice the client leaving at a write: the gateway watches its client and closes the request
    to the worker, and the worker (either engine) watches the gateway's connection and stops the job."""
    local = clients["local"]
    await provide(local, hub, model_files, "tiny-endless")
    extra: tuple[str, ...] = ()
    if engine == "llama-server":
        try:
            extra = ("--engine", "llama-server", "--llama-server", find_llama_server())
        except RbeeError as exc:
            pytest.skip(str(exc))
    worker = await local.spawn_worker("cpu", "tiny-endless", *extra)
    async with gateway(clients) as gw:
        await until(lambda: gw.table.candidates("tiny-endless"), 30, "the worker routable")
        body = {"model": "tiny-endless", "prompt": "Hello", "max_tokens": 4000, "temperature": 0}
        async with aiohttp.ClientSession() as s:
            ask = asyncio.ensure_future(s.post(f"{gw.url}/v1/completions", json=body))
            await until_async(lambda: queue(worker["client_url"]), 30, "the job on the worker")
            assert gw.in_flight() == 1
            ask.cancel()  # the client goes away while its whole answer is being generated
            with contextlib.suppress(asyncio.CancelledError):
                await ask
        # In far less time than the 4000 tokens take here (the embedded engine: about 8 s when nothing stops it).
        await until_async(lambda: all_idle([worker["client_url"]]), 2, "the job to be cancelled on the worker")
        await until(lambda: gw.in_flight() == 0, 5, "the gateway's lease to end")


async def all_idle(urls: list[str]) -> bool:
    return not any(await asyncio.gather(*(queue(u) for u in urls)))


async def until_async(predicate: Any, timeout: float, what: str) -> None:
    """Like `until`, for a predicate that must be awaited."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_worker_killed_mid_stream_ends_it_with_an_error_and_the_next_request_gets_a_new_one(
    clients: dict[str, PoolClient], hub: HubServer, model_files: dict[str, Path]
) -> None:
    await provide(clients["pool-a"], hub, model_files, "tiny-endless")
    events: list[GatewayEvent] = []
    async with gateway(clients, events) as gw:
        oa = api(gw)
        ask = {"model": "tiny-endless", "messages": ASK, "max_tokens": 4000, "temperature": 0}
        raw = await oa.chat.completions.with_raw_response.create(**ask, stream=True)
        victim = raw.headers["x-rbee-worker"]
        chunks = raw.parse().__aiter__()
        await chunks.__anext__()
        [w] = [w for w in live(clients["pool-a"]) if w["id"] == victim]
        os.kill(w["worker_pid"], signal.SIGKILL)
        with pytest.raises(openai.APIError) as lost:
            async for _ in chunks:
                pass
        assert f"worker {victim} (tiny-endless) on pool pool-a ended" in lost.value.message
        assert "killed by signal 9" in lost.value.message

        raw = await oa.chat.completions.with_raw_response.create(**{**ask, "max_tokens": 4})
        assert raw.parse().choices[0].finish_reason == "length"
        fresh = [w for w in live(clients["pool-a"]) if w["id"] == raw.headers["x-rbee-worker"]]
        assert fresh and fresh[0]["worker_pid"] != w["worker_pid"], "a new worker answered"
        assert len([e for e in events if isinstance(e, WorkerStarted)]) == 2


async def test_a_whole_answer_whose_worker_dies_is_answered_by_another(
    clients: dict[str, PoolClient], hub: HubServer, model_files: dict[str, Path]
) -> None:
    for name in clients:
        await provide(clients[name], hub, model_files, "tiny-endless")
    workers = {p: await c.spawn_worker("cpu", "tiny-endless") for p, c in clients.items()}
    events: list[GatewayEvent] = []
    async with gateway(clients, events) as gw:
        await until(lambda: len(gw.table.candidates("tiny-endless")) == 2, 30, "both workers routable")
        oa = api(gw)
        ask = {"model": "tiny-endless", "prompt": "Hello", "max_tokens": 600, "temperature": 0}
        answer = asyncio.ensure_future(oa.completions.with_raw_response.create(**ask))
        busy: list[str] = []

        async def someone_busy() -> bool:
            busy[:] = [p for p, w in workers.items() if await queue(w["client_url"])]
            return bool(busy)

        await until_async(someone_busy, 30, "the request to reach a worker")
        [victim] = busy
        os.kill(workers[victim]["worker_pid"], signal.SIGKILL)
        raw = await answer
        other = next(p for p in workers if p != victim)
        assert raw.headers["x-rbee-pool"] == other, "retried once, elsewhere"
        assert raw.parse().usage.completion_tokens == 600
        [lost] = [e for e in events if isinstance(e, WorkerLost)]
        assert lost.retried and victim in lost.where and "killed by signal 9" in lost.cause


async def test_a_lost_pool_leaves_the_routing_table_at_once_and_comes_back(
    clients: dict[str, PoolClient], site: Site
) -> None:
    a = clients["pool-a"]
    w = await a.spawn_worker("cpu", "tiny-test")
    async with gateway(clients) as gw:
        await until(lambda: [r.pool for r in gw.table.candidates("tiny-test")] == ["pool-a"], 30, "routable")
        site.sshd["pool-a"].kill()  # the machine's sshd dies; the worker, detached, lives on
        await until(lambda: a.view.state != CONNECTED, 15, "pool-a to be lost")
        assert not any(r.pool == "pool-a" for r in gw.table.routes.values()), "gone with its pool, at once"
        # Requests go on: the model is on the local pool too, so one is started there.
        raw = await api(gw).completions.with_raw_response.create(model="tiny-test", prompt="Hi", max_tokens=3)
        assert raw.headers["x-rbee-pool"] == "local"

        site.sshd["pool-a"].start()
        await until(lambda: a.view.state == CONNECTED, 30, "pool-a to reconnect")
        await until(
            lambda: any(r.key[:2] == ("pool-a", w["id"]) and r.routable for r in gw.table.routes.values()),
            30,
            "its worker to be routed to again",
        )
