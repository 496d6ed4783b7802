"""A llama-server worker as processes: rbee-worker and its llama-server start, stop and die together, with reasons.

Real processes throughout: rbee-hive spawns and stops them, the tests kill them, and llama-server's own /slots
(on its private port) says whether it is still generating.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import psutil
import pytest

from rbee_tui.catalog import CatalogStore
from rbee_tui.hive.records import group_members
from rbee_tui.tinymodel import TinySpec, write_model
from tests.conftest import REPO_ROOT, wait_for
from tests.e2e.test_llama_server import LLAMA_SERVER, needs_binary
from tests.e2e.test_worker_api import free_port, http

pytestmark = needs_binary
BINARY = ("--llama-server", str(LLAMA_SERVER))


def spawn(hive, *extra: str) -> dict:
    proc = hive(
        "worker",
        "spawn",
        "cpu",
        "--model",
        "tiny-test",
        "--engine",
        "llama-server",
        *BINARY,
        "--wait",
        "--json",
        *extra,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def listed(hive) -> list[dict]:
    return json.loads(hive("worker", "list", "--json", check=True).stdout)["workers"]


def engine_pid(url: str) -> int:
    status, health = http("GET", f"{url}/health")
    assert status == 200 and health["engine"] == "llama-server"
    return int(health["engine_pid"])


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_stop_ends_rbee_worker_and_llama_server(hive) -> None:
    w = spawn(hive)
    server = engine_pid(w["url"])
    # The inference process is llama-server, the child of the rbee-worker that answers on the worker's port.
    worker = psutil.Process(server).parent()
    assert w["worker_pid"] == server and worker is not None and worker.ppid() == w["pid"]
    assert "rbee_tui.worker.proxy" in worker.cmdline()
    # The worker's memory counts both processes.
    assert w["rss_bytes"] >= psutil.Process(server).memory_info().rss + worker.memory_info().rss // 2
    # llama-server listens on loopback only, on a port of its own.
    ports = {c.laddr.port for c in psutil.Process(server).net_connections() if c.status == "LISTEN"}
    assert ports and w["port"] not in ports
    stopped = json.loads(hive("worker", "stop", w["id"], "--json", check=True).stdout)
    assert stopped["stopped"] and not stopped["forced"] and stopped["exit_code"] == 0
    assert group_members(w["pid"]) == [] and gone(server)
    log = hive("worker", "logs", w["id"], check=True).stdout
    assert "model loaded" in log and "stopped (llama-server: exit code 0)" in log


def test_llama_server_dying_ends_the_worker_with_the_reason(hive) -> None:
    w = spawn(hive)
    os.kill(engine_pid(w["url"]), signal.SIGKILL)
    [dead] = wait_for(lambda: [x for x in listed(hive) if x["state"] == "exited"], timeout=30)
    assert dead["exit_code"] == 4 and dead["reason"].startswith("llama-server ended (killed by signal 9)")
    assert group_members(w["pid"]) == []
    hive("worker", "stop", w["id"], check=True)


def test_a_killed_worker_takes_llama_server_with_it(hive) -> None:
    w = spawn(hive)
    server = engine_pid(w["url"])
    os.kill(psutil.Process(server).ppid(), signal.SIGKILL)  # rbee-worker, not llama-server
    wait_for(lambda: gone(server), timeout=10, what="llama-server to die with its worker")
    [dead] = wait_for(lambda: [x for x in listed(hive) if x["state"] == "exited"], timeout=30)
    assert dead["signal"] == signal.SIGKILL and "killed by signal 9" in dead["reason"]
    assert group_members(w["pid"]) == []
    hive("worker", "stop", w["id"], check=True)


def test_a_model_llama_server_cannot_load(hive, models_dir: Path) -> None:
    hive("models", "catalog", check=True)
    hive("models", "register", "broken", "--repo", "a/b", "--file", "broken.gguf", check=True)
    path = models_dir / "broken" / "broken.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes((REPO_ROOT / "fixtures" / "tiny-test.gguf").read_bytes()[:100_000])
    store = CatalogStore(models_dir, "local")
    with store.edit() as cat:
        cat.put(replace(cat.get("broken"), downloaded=True))
    proc = hive("worker", "spawn", "cpu", "--model", "broken", "--engine", "llama-server", "--wait", *BINARY)
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert "died while starting" in line and "cannot load the model: llama-server ended" in line
    assert "not within the file bounds" in line  # llama.cpp's own words for a truncated file
    [w] = listed(hive)
    assert w["state"] == "exited" and w["exit_code"] == 2


def test_a_missing_binary_is_one_line(tmp_path: Path) -> None:
    model = REPO_ROOT / "fixtures" / "tiny-test.gguf"
    argv = [sys.executable, "-m", "rbee_tui.worker.launch", "--engine", "llama-server", "--model", str(model)]
    proc = subprocess.run(
        [*argv, "--llama-server", str(tmp_path / "nope"), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"rbee-worker: error: llama-server not found at {tmp_path / 'nope'}"]


# -- a generation nobody waits for stops ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A llama-server worker on a model big enough to take tens of seconds for its context, which a greedy
    generation fills: it never ends on its own."""
    spec = TinySpec(name="rbee slow", n_embd=512, n_layer=8, n_head=8, n_head_kv=8, n_ff=1536, n_ctx=4096, endless=True)
    model = write_model(tmp_path_factory.mktemp("models") / "slow.gguf", spec)
    port = free_port()
    argv = [sys.executable, "-m", "rbee_tui.worker.launch", "--engine", "llama-server", "--model", str(model)]
    log = model.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*argv, "--llama-server", str(LLAMA_SERVER), "--port", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: proc.poll() is not None or http("GET", f"{url}/health")[0] == 200, timeout=60)
    assert proc.poll() is None, log.read_text()
    yield url
    proc.terminate()
    assert proc.wait(30) == 0


def _generating(url: str) -> bool:
    """Whether the worker's llama-server is generating, as its own /slots says."""
    server = psutil.Process(engine_pid(url))
    [port] = {c.laddr.port for c in server.net_connections() if c.status == "LISTEN"}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/slots", timeout=5) as resp:
        return any(slot["is_processing"] for slot in json.load(resp))


async def test_a_client_that_leaves_stops_the_generation(slow: str) -> None:
    for route, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True}),
        ("/v1/completions", {"prompt": "Hello é", "stream": True}),
        ("/v1/completions", {"prompt": "Hello é"}),  # a whole answer, which its client stops waiting for
        ("/execute", {"prompt": "Hello é"}),
    ):
        async with aiohttp.ClientSession() as session:
            post = asyncio.ensure_future(
                session.post(f"{slow}{route}", json={**body, "max_tokens": 4000, "temperature": 0})
            )
            if body.get("stream") or route == "/execute":
                resp = await post
                assert resp.status == 200
                await resp.content.readline()  # the generation has started
                assert _generating(slow), route
                resp.close()  # the client goes away
            else:  # the answer comes once it is whole: the client stops waiting for it
                await asyncio.to_thread(wait_for, lambda: _generating(slow), 10)
                post.cancel()
        await asyncio.to_thread(wait_for, lambda: not _generating(slow), 10, 0.05, f"{route} to stop")
        assert http("GET", f"{slow}/health")[1]["queue"] == 0


async def test_cancel_stops_a_running_and_a_queued_job(slow: str) -> None:
    async with aiohttp.ClientSession() as session:
        running = await session.post(f"{slow}/execute", json={"job_id": "r", "prompt": "é", "max_tokens": 4000})
        await running.content.readline()
        queued = asyncio.ensure_future(session.post(f"{slow}/execute", json={"job_id": "q", "prompt": "é"}))
        await asyncio.to_thread(wait_for, lambda: http("GET", f"{slow}/health")[1].get("queue") == 2, 10)
        assert http("POST", f"{slow}/cancel/q")[1] == {"job_id": "q", "cancelled": True, "state": "queued"}
        waited = await queued
        done = [json.loads(line[6:]) async for line in waited.content if line.startswith(b"data:")]
        assert done[-1]["finish_reason"] == "cancelled" and done[-1]["tokens_generated"] == 0
        assert http("POST", f"{slow}/cancel/r")[1]["state"] == "running"
        events = [json.loads(line[6:]) async for line in running.content if line.startswith(b"data:")]
        assert events[-1]["finish_reason"] == "cancelled" and 0 < events[-1]["tokens_generated"] < 4000
        await asyncio.to_thread(wait_for, lambda: not _generating(slow), 10, 0.05, "the cancelled job to stop")
