"""Pools over SSH against real OpenSSH servers on 127.0.0.1: calls, tunnels, metrics, loss and recovery."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import psutil
import pytest

from rbee_tui import PROTOCOL
from rbee_tui.errors import HostKeyChanged, HostKeyUnknown, RbeeError
from rbee_tui.pools.client import CONNECTED, LOST, PoolClient
from rbee_tui.pools.hostkeys import trust
from rbee_tui.worker.client import execute
from tests.support.hub import HubServer
from tests.support.site import Site
from tests.support.sshd import keygen, sshd_available
from tests.support.waiting import until

pytestmark = pytest.mark.skipif(sshd_available() is not None, reason=str(sshd_available()))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture
def site(tmp_path: Path, hub: HubServer) -> Iterator[Site]:
    s = Site(tmp_path, hub)
    yield s
    s.stop()


@pytest.fixture
async def clients(site: Site) -> AsyncIterator[dict[str, PoolClient]]:
    out = {
        name: PoolClient(pool, sample_interval=0.5, keepalive_interval=2, keepalive_count_max=3, max_backoff=1)
        for name, pool in site.pools.items()
    }
    for c in out.values():
        c.start()
    for c in out.values():
        await c.wait_connected(30)
    yield out
    for c in out.values():
        try:
            if c.view.state == CONNECTED:
                for w in await c.workers():
                    await c.stop_worker(w["id"])
        finally:
            await c.close()


async def test_catalog_download_spawn_execute_stop_through_ssh(
    clients: dict[str, PoolClient], hub: HubServer, medium_gguf: Path, site: Site
) -> None:
    a, b = clients["pool-a"], clients["pool-b"]
    cat_a, cat_b = await asyncio.gather(a.hive("models", "catalog"), b.hive("models", "catalog"))
    assert (cat_a["pool_id"], cat_b["pool_id"]) == ("pool-a", "pool-b")
    assert Path(site.pools["pool-a"].models_dir, "catalog.json").exists()

    hub.add("rbee-test/medium-GGUF", "medium.gguf", data=medium_gguf.read_bytes())
    await b.hive("models", "register", "medium", "--repo", "rbee-test/medium-GGUF", "--file", "medium.gguf")
    events = [e async for e in b.hive_stream("models", "download", "medium")]
    assert events[-1]["event"] == "done" and events[-1]["size_bytes"] == medium_gguf.stat().st_size
    assert any(e["event"] == "progress" for e in events)

    w = await a.spawn_worker("cpu", "tiny-test")
    assert w["state"] == "ready"
    # The worker listens on the node's loopback only; we reach it through the SSH connection.
    assert w["client_url"] != w["url"]
    async with aiohttp.ClientSession() as session:
        out = [
            ev
            async for ev in execute(
                session, w["client_url"], w["engine"], {"prompt": "Hello through a tunnel", "max_tokens": 8, "seed": 3}
            )
        ]
    assert out[-1]["event"] == "done" and out[-1]["tokens_generated"] == 8
    assert "worker-cpu-0" in a.tunnels
    stopped = await a.stop_worker(w["id"])
    assert stopped["stopped"] and "worker-cpu-0" not in a.tunnels
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession() as session, session.get(f"{w['client_url']}/health") as resp:
            await resp.read()


async def test_a_spawn_waits_on_the_node_and_a_cancelled_one_leaves_no_worker(clients: dict[str, PoolClient]) -> None:
    a = clients["pool-a"]
    await a.workers()
    assert a.agent is not None
    calls = a.agent.calls
    spawned: list[dict] = []
    w = await a.spawn_worker("cpu", "tiny-test", on_spawned=spawned.append)
    # Two calls, spawn and `worker wait` (the node watches the worker's readiness): no polling of the list.
    assert a.agent.calls - calls == 2
    assert [x["id"] for x in spawned] == [w["id"]] and spawned[0]["state"] in ("starting", "loading", "ready")
    assert w["state"] == "ready" and w["ready_after_s"] > 0
    assert [(x["id"], x["state"]) for x in a.view.workers] == [(w["id"], "ready")]  # listed without a new read
    await a.stop_worker(w["id"])
    with pytest.raises(RbeeError, match="no worker 'nope' in this pool"):
        await a.wait_worker("nope")

    # Cancelled while the worker loads: what the node started is stopped.
    task: asyncio.Future[dict] = asyncio.ensure_future(
        a.spawn_worker("cpu", "tiny-test", on_spawned=lambda _: task.cancel())
    )
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await a.workers() == []
    # Cancelled before the node even answered the spawn (one turn of the loop has set the spawn going):
    # stopped once the node answers.
    calls = a.agent.calls
    task = asyncio.ensure_future(a.spawn_worker("cpu", "tiny-test"))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert a.agent.calls - calls == 3, "not the spawn, the stop and the list read again"
    assert await a.workers() == []


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    return out


async def test_metrics_stream_agrees_with_the_kernel(clients: dict[str, PoolClient]) -> None:
    a = clients["pool-a"]
    await until(lambda: len(a.view.history) >= 3, 30, "three samples")
    w = await a.spawn_worker("cpu", "tiny-test")
    await until(
        lambda: a.view.last_sample is not None and any(x.alive and x.rss_bytes for x in a.view.last_sample.workers),
        30,
        "the worker in the samples",
    )
    # The kernel's load average moves in steps every 5 s: read it beside each new sample, at the same moment.
    readings: list[tuple[float, list[float], dict[str, int]]] = []
    count = len(a.view.history)
    while len(a.view.history) < count + 2:
        readings.append((time.time(), [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]], _meminfo()))
        await asyncio.sleep(0.02)
    sample = a.view.last_sample
    assert sample is not None
    near = [(load, mem) for t, load, mem in readings if abs(t - sample.ts) <= 0.25]
    assert near
    mem = near[0][1]
    assert sample.ram.total == mem["MemTotal"]
    assert any(abs(sample.ram.used - (m["MemTotal"] - m["MemAvailable"])) <= 0.02 * m["MemTotal"] for _, m in near)
    assert any(
        all(abs(ours - kernel) <= 0.02 * max(kernel, 1.0) for ours, kernel in zip(sample.load, load, strict=True))
        for load, _ in near
    )
    assert 0.0 <= sample.cpu_percent <= 100.0 and sample.cores == os.cpu_count()
    assert sample.swap.total >= 0 and sample.net_rx_bps >= 0
    assert bool(sample.gpus) != bool(sample.gpus_reason), "no GPU must be said, not hidden"
    row = sample.worker(w["id"])
    assert row is not None and row.rss_bytes > 10_000_000 and row.pid == w["worker_pid"]
    assert len(a.view.history) <= a.view.history.maxlen
    assert a.view.history.maxlen >= 600


async def test_a_dead_pool_is_lost_and_comes_back_by_itself(clients: dict[str, PoolClient], site: Site) -> None:
    a, b = clients["pool-a"], clients["pool-b"]
    w = await a.spawn_worker("cpu", "tiny-test")
    await until(lambda: len(b.view.history) >= 2, 30, "pool-b samples")
    site.sshd["pool-a"].kill()  # the machine's sshd and every session under it die; the worker is detached
    took = await until(lambda: a.view.state != CONNECTED, 15, "pool-a to be lost")
    assert took < 15
    b_before = len(b.view.history)
    with pytest.raises(RbeeError, match="pool-a"):
        await a.hive("models", "catalog")  # fails at once with the reason, blocks nothing
    await until(lambda: len(b.view.history) >= b_before + 2, 10, "pool-b to keep streaming")
    assert b.view.state == CONNECTED

    site.sshd["pool-a"].start()
    await until(lambda: a.view.state == CONNECTED, 30, "pool-a to reconnect")
    samples = len(a.view.history)
    await until(lambda: len(a.view.history) >= samples + 2, 15, "pool-a to stream again")
    workers = await a.workers()
    assert [x["id"] for x in workers] == [w["id"]], "the worker was adopted, not spawned again"
    assert workers[0]["pid"] == w["pid"] and workers[0]["state"] == "ready"
    assert w["id"] in a.tunnels, "its tunnel came back by itself"
    url = await a.worker_url(workers[0])
    async with aiohttp.ClientSession() as session:
        out = [
            ev async for ev in execute(session, url, "llama-cpp-python", {"prompt": "still there?", "max_tokens": 4})
        ]
    assert out[-1]["tokens_generated"] == 4


async def test_a_silent_link_is_caught_by_keepalives(clients: dict[str, PoolClient], site: Site) -> None:
    a = clients["pool-a"]
    site.sshd["pool-a"].freeze()
    try:
        took = await until(lambda: a.view.state != CONNECTED, 15, "keepalives to notice")
        assert took < 15
        assert clients["pool-b"].view.state == CONNECTED
    finally:
        site.sshd["pool-a"].thaw()
    await until(lambda: a.view.state == CONNECTED, 30, "pool-a to reconnect")


async def test_unknown_and_changed_host_keys_are_refused(site: Site, tmp_path: Path) -> None:
    pool = site.pools["pool-a"]
    unknown = replace(pool, known_hosts=str(tmp_path / "empty_known_hosts"))
    c = PoolClient(unknown, max_backoff=1)
    c.start()
    await until(lambda: c.view.state == LOST, 15, "a refusal")
    assert "is unknown (SHA256:" in c.view.reason
    assert isinstance(c.view.error, HostKeyUnknown) and c.view.error.pool == "pool-a"
    await c.close()
    fingerprint = await trust(unknown, c.view.error.fingerprint)
    assert fingerprint.startswith("SHA256:")
    c = PoolClient(unknown)
    c.start()
    await c.wait_connected(30)
    await c.close()

    other = keygen(tmp_path / "other_host_key")
    pub = Path(f"{other}.pub").read_text().split()
    changed = tmp_path / "changed_known_hosts"
    changed.write_text(f"[127.0.0.1]:{pool.port} {pub[0]} {pub[1]}\n")
    c = PoolClient(replace(pool, known_hosts=str(changed)), max_backoff=1)
    c.start()
    await until(lambda: c.view.state == LOST, 15, "a refusal")
    assert "CHANGED" in c.view.reason and "ssh-keygen -R" in c.view.reason
    assert isinstance(c.view.error, HostKeyChanged) and c.view.error.fingerprint == fingerprint
    await c.close()


async def test_shell_characters_never_reach_a_shell(clients: dict[str, PoolClient], tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    a = clients["pool-a"]
    with pytest.raises(RbeeError, match="invalid model id"):
        await a.hive("worker", "spawn", "cpu", "--model", f"x; touch {canary}")
    with pytest.raises(RbeeError, match="invalid model id"):
        await a.hive("models", "register", f"$(touch {canary})", "--repo", "a/b", "--file", "m.gguf")
    assert not canary.exists()
    with pytest.raises(RbeeError, match="invalid host name"):
        PoolClient(replace(a.pool, host=f"127.0.0.1; touch {canary}"))
    assert not canary.exists()


async def test_many_calls_at_once_stay_under_max_sessions(clients: dict[str, PoolClient]) -> None:
    a = clients["pool-a"]
    results = await asyncio.gather(*[a.hive("models", "list") for _ in range(24)])
    assert all(r["pool_id"] == "pool-a" for r in results)


def test_fan_out_cli(site: Site, tmp_path: Path) -> None:
    import tomli_w

    cfg = tmp_path / "config.toml"
    pools = [{"name": "local", "transport": "local", "models_dir": str(tmp_path / "local-models")}]
    for p in site.pools.values():
        pools.append({k: v for k, v in p.to_toml().items()})
    cfg.write_text(tomli_w.dumps({"pools": pools}))
    tui = [sys.executable, "-m", "rbee_tui.cli", "--config", str(cfg)]
    site.sshd["pool-b"].kill()
    proc = subprocess.run([*tui, "pools", "status", "--json"], capture_output=True, text=True, timeout=120)
    doc = json.loads(proc.stdout)
    by_name = {p["name"]: p for p in doc["pools"]}
    assert by_name["local"]["state"] == "connected" and by_name["pool-a"]["state"] == "connected"
    assert by_name["pool-b"]["state"] == "lost" and "cannot connect" in by_name["pool-b"]["reason"]
    assert by_name["pool-a"]["status"]["pool_id"] == "pool-a"
    assert proc.returncode == 1, "a lost pool makes the status command fail"
    human = subprocess.run([*tui, "pools", "status"], capture_output=True, text=True, timeout=120).stdout
    assert "pool-a" in human and "connected" in human and "lost" in human
    cat = subprocess.run(
        [*tui, "pool", "pool-a", "models", "catalog", "--json"], capture_output=True, text=True, timeout=120
    )
    assert cat.returncode == 0, cat.stderr
    assert json.loads(cat.stdout)["pool_id"] == "pool-a"
    table = subprocess.run([*tui, "pool", "pool-a", "models", "catalog"], capture_output=True, text=True, timeout=120)
    assert "Model Catalog for pool-a" in table.stdout
    bad = subprocess.run([*tui, "pool", "pool-b", "worker", "list"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "cannot connect" in bad.stderr


async def test_a_missed_sample_is_not_a_lost_pool(clients: dict[str, PoolClient], site: Site) -> None:
    import psutil

    a = clients["pool-a"]
    await until(lambda: len(a.view.history) >= 2, 30, "samples")
    [metrics] = [p for p in site.sshd["pool-a"].tree() if "metrics" in " ".join(p.cmdline())]
    metrics.suspend()  # the sampler stalls for a few intervals (a busy node), the link stays fine
    try:
        await asyncio.sleep(a.sample_interval * 4)
        assert a.view.state == CONNECTED
    finally:
        metrics.resume()
    count = len(a.view.history)
    await until(lambda: len(a.view.history) > count, 10, "samples to flow again")
    assert a.view.state == CONNECTED and psutil.pid_exists(metrics.pid), "the same stream carried on"


async def test_a_missing_agent_names_the_install_command(site: Site) -> None:
    pool = replace(site.pools["pool-a"], hive_command="/nonexistent/rbee-hive")
    c = PoolClient(pool, max_backoff=1)
    c.start()
    try:
        assert await c.first_outcome(30) == LOST
        assert "rbee-hive is not installed on pool-a" in c.view.reason
        assert "pip install" in c.view.reason
    finally:
        await c.close()


def _agents(pool: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[-1] == "serve" and pool in cmd:
            found.append(p)
    return found


async def test_calls_go_through_one_agent_which_is_restarted_if_killed(clients: dict[str, PoolClient]) -> None:
    a = clients["pool-a"]
    assert a.agent is not None and a.agent.hello["protocol"] == PROTOCOL
    before = a.agent.calls
    for _ in range(5):
        await a.hive("models", "catalog")
    assert a.agent.calls == before + 5
    (agent,) = _agents("pool-a")  # one long-lived process on the node serves them all
    agent.kill()
    await until(lambda: a.agent is not None and not a.agent.alive, 10, "the client to see the agent gone")
    # The next calls still work (one process per call until the agent is back), then go through a new agent.
    assert (await a.hive("models", "catalog"))["pool_id"] == "pool-a"
    a._agent_retry_at = 0  # skip the pause between restarts
    assert (await a.hive("models", "catalog"))["pool_id"] == "pool-a"
    assert a.agent is not None and a.agent.alive
    (again,) = _agents("pool-a")
    assert again.pid != agent.pid and a.view.state == CONNECTED


async def test_close_returns_while_samples_pour_in(site: Site) -> None:
    # A cancellation that lands just as a sample arrives must not be lost: close() would wait forever and leave the
    # node's agent and metrics stream running. Samples every 10 ms make that moment likely on every try.
    for attempt in range(25):
        c = PoolClient(site.pools["pool-a"], sample_interval=0.01)
        c.start()
        await c.wait_connected(30)
        await until(lambda c=c: len(c.view.history) >= 3, 10, "samples to flow")
        try:
            async with asyncio.timeout(4):  # under close()'s own 5 s second try: the first cancel must do
                await c.close()
        except TimeoutError:
            pytest.fail(f"close() did not return (try {attempt})")
        await until(lambda: not _agents("pool-a"), 10, "the node's agent to end")


async def test_a_worker_spawned_through_the_agent_starts_warm_and_outlives_it(clients: dict[str, PoolClient]) -> None:
    a = clients["pool-a"]
    w = await a.spawn_worker("cpu", "tiny-test")
    lines = (await a.hive("worker", "logs", w["id"], "--lines", "20"))["lines"]
    assert any("spawn (forked warm)" in line for line in lines), lines  # no new interpreter was started
    assert " ".join(psutil.Process(w["worker_pid"]).cmdline()).startswith("rbee-worker --model ")  # as ps shows it
    async with aiohttp.ClientSession() as session:
        url = await a.worker_url(w)
        out = [ev async for ev in execute(session, url, "llama-cpp-python", {"prompt": "hi", "max_tokens": 4})]
    assert out[-1]["tokens_generated"] == 4
    (agent,) = _agents("pool-a")
    agent.kill()  # the agent it was forked from dies: the worker lives on, in its own session
    await until(lambda: a.agent is not None and not a.agent.alive, 10, "the client to see the agent gone")
    (again,) = [x for x in await a.workers() if x["id"] == w["id"]]
    assert again["state"] == "ready" and again["worker_pid"] == w["worker_pid"]
    stopped = await a.stop_worker(w["id"])
    assert stopped["exit_code"] == 0 and not stopped["forced"]  # it ended on SIGTERM and its end was recorded
    assert not psutil.pid_exists(w["worker_pid"]) or psutil.Process(w["worker_pid"]).status() == "zombie"


async def test_an_ssh_pool_without_models_dir_uses_the_nodes_own_default(
    site: Site, tmp_path: Path, isolated_home: Path
) -> None:
    c = PoolClient(replace(site.pools["pool-a"], models_dir=None))
    c.start()
    try:
        await c.wait_connected(30)
        node_default = tmp_path / "home-pool-a" / "data" / "rbee" / "models"  # the node's XDG_DATA_HOME
        assert c.view.status["models_dir"] == str(node_default)
        assert (await c.hive("models", "catalog"))["pool_id"] == "pool-a"
        assert (node_default / "catalog.json").exists()
        assert not (isolated_home / "data" / "rbee" / "models").exists(), "this machine's path was used"
    finally:
        await c.close()
