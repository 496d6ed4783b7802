"""A model split over three pools with llama.cpp RPC: the local pool and two sshd pools on this machine.

Real processes throughout: ggml-rpc-server on each node (`rbee-hive rpc`), the SSH relays, the coordinator
(a llama-server worker of kind `cluster` on the head), and the cluster's watcher in the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from rbee_tui.cluster.planner import RPC_SERVER_OVERHEAD, MiB, Placement
from rbee_tui.cluster.runtime import Cluster
from rbee_tui.config import PoolConfig
from rbee_tui.errors import RbeeError
from rbee_tui.hive.rpc import build_cache
from rbee_tui.pools.client import CONNECTED, PoolClient
from rbee_tui.tinymodel import TinySpec, write_model
from rbee_tui.worker.client import execute
from rbee_tui.worker.upstream import find_llama_server
from tests.conftest import BIN
from tests.support.hub import HubServer
from tests.support.site import Site
from tests.support.sshd import sshd_available
from tests.support.waiting import until


def _rpc_binary() -> str | None:
    found = sorted(glob.glob(str(build_cache() / "*" / "bin" / "ggml-rpc-server")))
    return found[-1] if found else None


RPC = _rpc_binary()
pytestmark = [
    pytest.mark.skipif(RPC is None, reason="ggml-rpc-server is not built: run scripts/build-llama-cpp.sh"),
    pytest.mark.skipif(sshd_available() is not None, reason=str(sshd_available())),
]
MODEL = "split6"
PROMPT = {"prompt": "Hello, how are you?", "temperature": 0.0, "seed": 42}


@pytest.fixture(scope="session")
def split_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six layers: two per node over three nodes."""
    path = tmp_path_factory.mktemp("cluster") / "split6.gguf"
    return write_model(path, TinySpec(name="rbee split", n_layer=6, n_embd=64, n_ff=128, n_ctx=2048, seed=11))


@pytest.fixture
def site(tmp_path: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / "cache"))  # the local node's tensor cache
    s = Site(tmp_path, hub)
    yield s
    s.stop()


@pytest.fixture
async def clients(
    site: Site, hub: HubServer, split_gguf: Path, hive: Callable[..., subprocess.CompletedProcess[str]]
) -> AsyncIterator[dict[str, PoolClient]]:
    hub.add("rbee-test/split6-GGUF", "split6.gguf", data=split_gguf.read_bytes())
    hive("models", "register", MODEL, "--repo", "rbee-test/split6-GGUF", "--file", "split6.gguf", check=True)
    hive("models", "download", MODEL, check=True)
    pools = {"local": PoolConfig(name="local", transport="local"), **site.pools}
    out = {
        name: PoolClient(pool, sample_interval=0.5, keepalive_interval=1, keepalive_count_max=3, max_backoff=1)
        for name, pool in pools.items()
    }
    for c in out.values():
        c.start()
    await asyncio.gather(*(c.wait_connected(30) for c in out.values()))
    yield out
    await asyncio.gather(*(c.close() for c in out.values()))


def _cluster(clients: dict[str, PoolClient], **kw: Any) -> Cluster:
    kw.setdefault("policy", "spread")
    return Cluster(clients, MODEL, ["local", "pool-a", "pool-b"], ctx=2048, threads=1, verbose=True, **kw)


async def _generate(url: str, max_tokens: int, on_token: Callable[[], None] | None = None) -> list[str]:
    tokens: list[str] = []
    async with aiohttp.ClientSession() as session:
        async for ev in execute(session, url, "llama-server", {**PROMPT, "max_tokens": max_tokens}):
            if ev["event"] == "token":
                tokens.append(ev["t"])
                if on_token is not None:
                    on_token()
    return tokens


STARTED = time.time()


def _leftovers(ports: set[int], model_path: str) -> list[str]:
    """Our RPC servers (by port) and coordinators (by model file), and their supervisors, still running anywhere
    on this machine (started by this test session: other sessions may run RPC servers of their own)."""
    out = []
    for proc in psutil.process_iter(["pid", "cmdline", "status", "create_time"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE or not cmd or proc.info["create_time"] < STARTED:
            continue
        rpc = any(Path(a).name == "ggml-rpc-server" for a in cmd) and any(
            a == "-p" and int(b) in ports for a, b in itertools.pairwise(cmd)
        )
        coordinator = model_path in cmd and any("llama-server" in a for a in cmd)
        if rpc or coordinator:
            out.append(f"{proc.info['pid']} {' '.join(cmd)}")
    return out


def _rpc_ports(ready: dict[str, Any]) -> set[int]:
    return {int(n["rpc_port"]) for n in ready["nodes"]}


PRINTED = MiB // 200  # llama.cpp prints buffer sizes to 0.01 MiB: each logged figure is this close to the bytes


def _predicted_buffers(placement: Placement) -> dict[str, int]:
    """Per pool, the part of the planner's prediction that llama.cpp logs as buffers: everything but the
    RPC_SERVER_OVERHEAD it adds for each process (ggml-rpc-server on every node, llama-server besides on the head),
    which no buffer line reports."""
    return {s.name: s.total_bytes - RPC_SERVER_OVERHEAD * (2 if s.coordinator else 1) for s in placement.shares}


async def test_split_over_three_pools_matches_one_worker_and_stops_clean(clients: dict[str, PoolClient]) -> None:
    local = clients["local"]
    # The reference: the same model on one llama-server worker, greedy, same seed.
    server = find_llama_server()
    single = await local.spawn_worker("cpu", MODEL, "--engine", "llama-server", "--llama-server", server)
    expected = await _generate(single["client_url"], 24)
    await local.stop_worker(single["id"])
    assert len(expected) == 24

    cluster = _cluster(clients)
    placement = await cluster.plan()
    planned = {il: s.name for s in placement.shares for il in s.layers}
    planned[placement.n_layer] = placement.shares[-1].name  # the output layer
    assert [s.name for s in placement.shares] == ["local", "pool-a", "pool-b"]

    ready = await cluster.spawn()
    try:
        assert ready["port"] and [n["pool"] for n in ready["nodes"]] == ["local", "pool-a", "pool-b"]
        assert all(n["memory_bytes"] > 0 and 0 < n["share"] < 1 for n in ready["nodes"])
        # The SSH nodes are reached through relays: the head dials loopback ports that are not the servers' own.
        assert all(n["endpoint"].startswith("127.0.0.1:") for n in ready["nodes"])
        assert await cluster.reported_layers() == planned
        # Weights and KV cache: what llama.cpp logs for each node is what the planner put there, to the byte
        # (as printed). The token embeddings are the coordinator's host buffer (CPU_Mapped), not its RPC device's.
        memory = await cluster.reported_memory()
        assert set(memory) == {"local", "pool-a", "pool-b"}
        assert cluster.shape is not None
        for s in placement.shares:
            weights = s.weight_bytes - (cluster.shape.input_bytes if s.coordinator else 0)
            assert abs(memory[s.name]["model"] - weights) <= PRINTED, (s.name, memory[s.name], weights)
            assert abs(memory[s.name]["KV"] - s.kv_bytes) <= PRINTED, (s.name, memory[s.name], s.kv_bytes)
        assert abs(memory["local"]["host model"] - cluster.shape.input_bytes) <= PRINTED, memory["local"]

        # What llama.cpp reports is what was planned; the text is the single worker's.
        assert await _generate(ready["url"], 24) == expected

        # The coordinator is a worker of kind `cluster` on the head, like any other.
        workers = await local.workers()
        assert [(w["id"], w["kind"], w["state"]) for w in workers] == [(ready["coordinator"]["id"], "cluster", "ready")]

        # A second cluster over a busy rpc-server is refused, naming the node.
        other = Cluster(clients, MODEL, ["local", "pool-a"], ctx=2048, policy="spread")
        with pytest.raises(RbeeError, match=r"rpc-server of local \(127.0.0.1:\d+\) is busy: it serves another"):
            await other.plan()
        running = _leftovers(_rpc_ports(ready), cluster.head_info["path"])
        assert sum(" -m rbee_tui.hive.supervise " not in p and "rpc-server -H" in p for p in running) == 3
        assert any("llama-server -m" in p for p in running)
    finally:
        await cluster.stop()
    await until(lambda: not _leftovers(_rpc_ports(ready), cluster.head_info["path"]), 15, "nothing left running")
    assert await local.workers() == []
    for name, c in clients.items():
        st = await c.hive("rpc", "status")
        assert not st["running"], name


async def test_each_node_holds_within_10_percent_of_the_plan(clients: dict[str, PoolClient]) -> None:
    """After load, the buffers llama.cpp logs for each node (model, KV and compute; on the head also the
    coordinator's host buffers: CPU_Mapped token embeddings, CPU compute and output) add up to the planner's
    prediction for that node within 10 %, like with like (see `_predicted_buffers`)."""
    # Only the 10 % comparison may fail as expected: anything else here fails the test (raises=AssertionError).
    cluster = _cluster(clients)
    ready = await cluster.spawn()
    try:
        run = cluster.running
        if run is None:
            pytest.fail("the cluster is not running after spawn")
        predicted = _predicted_buffers(run.placement)
        memory = await cluster.reported_memory()
    finally:
        await cluster.stop()
    try:
        await until(lambda: not _leftovers(_rpc_ports(ready), cluster.head_info["path"]), 15, "nothing left running")
    except AssertionError as exc:
        pytest.fail(str(exc))
    if set(memory) != set(predicted):
        pytest.fail(f"buffers logged for {sorted(memory)}, planned for {sorted(predicted)}")
    reported = {pool: sum(kinds.values()) for pool, kinds in memory.items()}
    off = {
        pool: (predicted[pool], reported[pool])
        for pool in predicted
        if abs(predicted[pool] - reported[pool]) > 0.10 * reported[pool]
    }
    assert not off, f"(predicted, logged) bytes, more than 10 % apart: {off}; logged: {memory}"


async def _fail_mid_generation(
    clients: dict[str, PoolClient], kill: Callable[[dict[str, Any]], None], **kw: Any
) -> tuple[Cluster, dict[str, Any], float, str]:
    """Start a long generation, `kill` something once tokens flow; return the cluster, the ready event, seconds
    from the kill to the request's failure, and the failure's message."""
    cluster = _cluster(clients, **kw)
    ready = await cluster.spawn()
    stopping = asyncio.Event()
    watcher = asyncio.create_task(cluster.watch(stopping))
    killed_at: list[float] = []

    def on_token() -> None:
        if not killed_at:
            killed_at.append(time.monotonic())
            kill(ready)

    with pytest.raises(RuntimeError) as failure:
        await asyncio.wait_for(_generate(ready["url"], 1500, on_token), 60)
    elapsed = time.monotonic() - killed_at[0]
    cluster._test_watch = (stopping, watcher)  # type: ignore[attr-defined]
    return cluster, ready, elapsed, str(failure.value)


async def _finish(cluster: Cluster) -> None:
    stopping, watcher = cluster._test_watch  # type: ignore[attr-defined]
    stopping.set()
    await asyncio.wait_for(watcher, 30)
    await cluster.stop()


async def test_a_dead_rpc_server_fails_the_request_and_the_cluster_restarts_without_it(
    clients: dict[str, PoolClient], split_gguf: Path
) -> None:
    def kill(ready: dict[str, Any]) -> None:
        pid = next(n["rpc_pid"] for n in ready["nodes"] if n["pool"] == "pool-a")
        psutil.Process(pid).kill()

    cluster, ready, elapsed, message = await _fail_mid_generation(clients, kill)
    try:
        assert elapsed < 15, elapsed
        assert "pool-a" in message and "rpc-server" in message, message
        await until(lambda: any(e["event"] in ("restarted", "restart_refused") for e in cluster.events), 60, "restart")
        events = [e["event"] for e in cluster.events]
        assert events[:3] == ["ready", "failed", "ready"] and events[-1] == "restarted", cluster.events
        assert [n["pool"] for n in cluster.describe()["nodes"]] == ["local", "pool-b"]
        # The restarted cluster answers on the same port.
        assert len(await _generate(ready["url"], 8)) == 8
    finally:
        await _finish(cluster)
    for c in clients.values():
        assert not (await c.hive("rpc", "status"))["running"]
    assert await clients["local"].workers() == []
    assert not _leftovers(_rpc_ports(ready), cluster.head_info["path"])


async def test_a_lost_node_fails_the_request_and_is_cleaned_when_it_returns(
    clients: dict[str, PoolClient], split_gguf: Path, site: Site
) -> None:
    def kill(ready: dict[str, Any]) -> None:
        site.sshd["pool-b"].kill()

    cluster, ready, elapsed, message = await _fail_mid_generation(clients, kill)
    try:
        assert elapsed < 15, elapsed
        assert "pool-b" in message, message
        await until(lambda: any(e["event"] in ("restarted", "restart_refused") for e in cluster.events), 60, "restart")
        assert cluster.events[-1]["event"] == "restarted", cluster.events
        assert [n["pool"] for n in cluster.describe()["nodes"]] == ["local", "pool-a"]
        assert "pool-b" in cluster.to_clean  # its rpc-server could not be reached to stop it
        # The node comes back: the watcher stops what it left there.
        site.sshd["pool-b"].start()
        await until(lambda: clients["pool-b"].view.state == CONNECTED, 30, "pool-b back")
        await until(lambda: "pool-b" not in cluster.to_clean, 30, "pool-b cleaned")
        assert not (await clients["pool-b"].hive("rpc", "status"))["running"]
    finally:
        await _finish(cluster)
    assert await clients["local"].workers() == []
    assert not _leftovers(_rpc_ports(ready), cluster.head_info["path"])


async def test_a_silent_link_is_caught_by_the_stall_watch(clients: dict[str, PoolClient]) -> None:
    frozen: list[int] = []

    def freeze(ready: dict[str, Any]) -> None:
        # A stopped rpc-server keeps its connection open and answers nothing: llama-server waits forever.
        frozen.append(next(n["rpc_pid"] for n in ready["nodes"] if n["pool"] == "pool-a"))
        os.kill(frozen[0], signal.SIGSTOP)

    cluster, ready, elapsed, message = await _fail_mid_generation(clients, freeze, stall_s=4)
    try:
        assert 4 <= elapsed < 15, elapsed
        assert "produced nothing for 4s" in message, message
        await until(lambda: any(e["event"] in ("restarted", "restart_refused") for e in cluster.events), 60, "restart")
        assert cluster.events[-1]["event"] == "restarted", cluster.events
        assert not psutil.pid_exists(frozen[0]) or psutil.Process(frozen[0]).status() == psutil.STATUS_ZOMBIE
        assert len(await _generate(ready["url"], 8)) == 8
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen[0], signal.SIGCONT)
        await _finish(cluster)
    assert not _leftovers(_rpc_ports(ready), cluster.head_info["path"])


async def test_a_mismatched_build_is_refused_naming_both(clients: dict[str, PoolClient], tmp_path: Path) -> None:
    assert RPC is not None
    other = tmp_path / "llama-other" / "bin"
    other.mkdir(parents=True)
    os.symlink(RPC, other / "ggml-rpc-server")
    (other / "BUILD_COMMIT").write_text("9.9.9-other (build 1, commit abcdef)\n")
    from dataclasses import replace

    clients["pool-b"].pool = replace(clients["pool-b"].pool, rpc_server=str(other / "ggml-rpc-server"))
    cluster = _cluster(clients)
    with pytest.raises(RbeeError, match=r"pool-b runs llama.cpp build 9.9.9-other .*, the head local runs \S+"):
        await cluster.plan()
    # nothing was started on any node
    for c in clients.values():
        assert not (await c.hive("rpc", "status"))["running"]


async def test_the_command_line_plans_spawns_watches_and_stops(
    clients: dict[str, PoolClient], site: Site, tmp_path: Path
) -> None:
    from rbee_tui import config as cfgmod

    cfg_path = tmp_path / "rbee.toml"
    cfgmod.save(cfgmod.Config(pools=(PoolConfig(name="local"), site.pools["pool-a"])), cfg_path)
    base = [str(BIN / "rbee-tui") if (BIN / "rbee-tui").exists() else sys.executable, "--config", str(cfg_path)]
    if not (BIN / "rbee-tui").exists():
        base[1:1] = ["-m", "rbee_tui.cli"]
    args = ["--model", MODEL, "--pools", "local,pool-a", "--spread", "--json"]
    plan = subprocess.run([*base, "cluster", "plan", *args], capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    assert [(n["pool"], n["layers"]) for n in planned["nodes"]] == [("local", [0, 2]), ("pool-a", [3, 5])]
    assert planned["args"][:4] == ["--rpc", "<local rpc>,<pool-a rpc>", "--tensor-split", "3,4"]

    spawn = subprocess.Popen(
        [*base, "cluster", "spawn", *args, "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert spawn.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(spawn.stdout.readline), 120)
        ready = json.loads(line)
        assert ready["event"] == "ready" and [n["pool"] for n in ready["nodes"]] == ["local", "pool-a"]
        assert len(await _generate(ready["url"], 8)) == 8
        status = subprocess.run(
            [*base, "cluster", "status", "--model", MODEL, "--json"], capture_output=True, text=True, timeout=30
        )
        doc = json.loads(status.stdout)
        assert doc["state"] == "ready" and doc["watcher_alive"] and doc["port"] == ready["port"]
        stop = subprocess.run(
            [*base, "cluster", "stop", "--model", MODEL, "--json"], capture_output=True, text=True, timeout=120
        )
        assert stop.returncode == 0 and json.loads(stop.stdout)["by"] == "watcher", stop.stderr
        assert spawn.wait(30) == 0
    finally:
        if spawn.poll() is None:
            spawn.kill()
    assert not _leftovers(_rpc_ports(ready), "-")
    for name in ("local", "pool-a"):
        assert not (await clients[name].hive("rpc", "status"))["running"], name
    assert await clients["local"].workers() == []
