"""`rbee-hive worker ...`: spawn, readiness, list, stop, logs, refusals, crashes, on real worker processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import psutil
import pytest

from rbee_tui.catalog import CatalogStore
from rbee_tui.hive.records import group_members
from rbee_tui.worker.client import execute, probe_health
from tests.conftest import REPO_ROOT, hive_cmd, wait_for


def spawn(hive, *extra: str) -> dict:
    proc = hive("worker", "spawn", "cpu", "--model", "tiny-test", "--wait", "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def workers(hive) -> list[dict]:
    return json.loads(hive("worker", "list", "--json", check=True).stdout)["workers"]


async def test_spawn_execute_stop_leaves_nothing_behind(hive) -> None:
    w = spawn(hive)
    assert w["state"] == "ready" and w["id"] == "worker-cpu-0" and w["url"].startswith("http://127.0.0.1:")
    assert w["rss_bytes"] > 0 and w["worker_pid"] != w["pid"]
    assert [x["id"] for x in workers(hive)] == ["worker-cpu-0"]
    async with aiohttp.ClientSession() as session:
        events = [
            ev
            async for ev in execute(
                session, w["url"], w["engine"], {"prompt": "Hello, how are you?", "max_tokens": 10, "seed": 42}
            )
        ]
    assert sum(ev["event"] == "token" for ev in events) == 10
    assert events[-1]["tokens_generated"] == 10
    # Only loopback: the worker is not reachable on another address of this machine.
    listening = [c.laddr for c in psutil.Process(w["worker_pid"]).net_connections() if c.status == "LISTEN"]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
    stopped = json.loads(hive("worker", "stop", "worker-cpu-0", "--json", check=True).stdout)
    assert stopped["stopped"] and not stopped["forced"] and stopped["exit_code"] == 0
    assert group_members(w["pid"]) == []
    assert not psutil.pid_exists(w["worker_pid"]) or psutil.Process(w["worker_pid"]).status() == "zombie"
    assert workers(hive) == []
    log = hive("worker", "logs", "worker-cpu-0", check=True).stdout
    assert "model loaded" in log and "stopped" in log


def test_spawn_reports_its_way_to_ready(hive) -> None:
    out = json.loads(hive("worker", "spawn", "cpu", "--model", "tiny-test", "--json", check=True).stdout)
    seen: list[str] = []

    def ready() -> bool:
        state, _ = probe_health(out["url"], out["engine"], timeout=1)
        if not seen or seen[-1] != state:
            seen.append(state)
        return state == "ready"

    wait_for(ready, timeout=60, interval=0)
    # The port is the worker's from the spawn on (rbee-hive binds it): before the server answers, "starting".
    assert seen[-1] == "ready" and set(seen) <= {"starting", "loading", "ready"}
    hive("worker", "stop", out["id"], check=True)


def test_refusals_use_the_seed_messages(hive) -> None:
    proc = hive("worker", "spawn", "cpu", "--model", "tinyllama")
    assert proc.returncode == 1
    assert "Model tinyllama not downloaded. Run: rbee-hive models download tinyllama" in proc.stderr
    hive("models", "register", "metal-only", "--repo", "a/b", "--file", "m.gguf", "--backends", "metal", check=True)
    store = CatalogStore(Path(os.environ["XDG_DATA_HOME"]) / "rbee" / "models", "local")
    with store.edit() as cat:
        cat.put(replace(cat.get("metal-only"), downloaded=True))
    proc = hive("worker", "spawn", "cpu", "--model", "metal-only")
    assert proc.returncode == 1 and "Model metal-only doesn't support cpu backend" in proc.stderr
    if not psutil.LINUX or not Path("/dev/nvidia0").exists():
        proc = hive("worker", "spawn", "cuda", "--model", "tiny-test")
        assert proc.returncode == 1 and "Backend cuda is not available on this pool" in proc.stderr
    proc = hive("worker", "spawn", "cpu", "--model", "$(reboot)")
    assert proc.returncode == 1 and "invalid model id" in proc.stderr
    assert workers(hive) == []


def test_a_killed_worker_shows_as_exited(hive) -> None:
    w = spawn(hive)
    os.kill(w["worker_pid"], signal.SIGKILL)
    gone = wait_for(lambda: [x for x in workers(hive) if x["state"] == "exited"], timeout=30)
    assert gone[0]["signal"] == signal.SIGKILL
    assert "killed by signal 9" in gone[0]["reason"]
    assert any("model loaded" in line for line in gone[0]["last_log"])
    human = hive("worker", "list", check=True).stdout
    assert "exited (signal 9)" in human
    hive("worker", "stop", w["id"], check=True)
    assert workers(hive) == []


def test_a_corrupt_model_fails_the_spawn_with_its_reason(hive, models_dir: Path) -> None:
    hive("models", "catalog", check=True)
    store = CatalogStore(models_dir, "local")
    hive("models", "register", "broken", "--repo", "a/b", "--file", "broken.gguf", check=True)
    path = models_dir / "broken" / "broken.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes((REPO_ROOT / "fixtures" / "tiny-test.gguf").read_bytes()[:100_000])
    with store.edit() as cat:
        cat.put(replace(cat.get("broken"), downloaded=True))
    proc = hive("worker", "spawn", "cpu", "--model", "broken", "--wait")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "died while starting" in lines[0] and "could not load" in lines[0]
    [w] = workers(hive)
    assert w["state"] == "exited" and w["exit_code"] == 2


def test_ports_are_chosen_free(hive) -> None:
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            blocker.bind(("127.0.0.1", 8000))
            blocker.listen()
        except OSError:
            pytest.skip("port 8000 is taken on this machine already")
        a = spawn(hive)
        b = spawn(hive)
    assert a["port"] > 8000 and b["port"] > a["port"]
    assert (a["id"], b["id"]) == ("worker-cpu-0", "worker-cpu-0-2")
    taken = hive("worker", "spawn", "cpu", "--model", "tiny-test", "--port", str(a["port"]))
    assert taken.returncode == 1 and "already in use" in taken.stderr
    for w in (a, b):
        hive("worker", "stop", w["id"], check=True)


def test_stop_kills_the_group_when_sigterm_is_not_enough(hive) -> None:
    w = spawn(hive)
    os.kill(w["worker_pid"], signal.SIGSTOP)  # a wedged worker: it cannot act on SIGTERM
    t0 = time.monotonic()
    result = json.loads(hive("worker", "stop", w["id"], "--grace", "0.5", "--json", check=True).stdout)
    assert result["forced"] is True
    assert time.monotonic() - t0 < 10
    assert group_members(w["pid"]) == []


def test_logs_follow_until_the_worker_ends(hive) -> None:
    w = spawn(hive)
    follower = subprocess.Popen(
        hive_cmd("worker", "logs", w["id"], "--follow"), stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    first = follower.stdout.readline()  # type: ignore[union-attr]
    assert "spawn:" in first
    hive("worker", "stop", w["id"], check=True)
    rest, _ = follower.communicate(timeout=30)
    assert follower.returncode == 0
    assert "stopped" in rest
