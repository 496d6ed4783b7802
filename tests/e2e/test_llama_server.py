"""The llama-server engine: same spawn/list/stop, same /execute summary numbers, same greedy tokens as the
embedded engine (tests/e2e/test_proxy.py covers its processes, test_openai_clients.py its OpenAI API)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
from pathlib import Path

import aiohttp
import pytest

from rbee_tui.hive.records import group_members
from rbee_tui.worker.client import classify_health, execute


def _binary() -> str | None:
    env = os.environ.get("RBEE_LLAMA_SERVER")
    if env:
        return env
    found = sorted(glob.glob(str(Path.home() / ".cache/rbee/llama.cpp/*/bin/llama-server")))
    return found[-1] if found else None


LLAMA_SERVER = _binary()
SPAWN_SERVER = ("worker", "spawn", "cpu", "--model", "tiny-test", "--engine", "llama-server", "--llama-server")
needs_binary = pytest.mark.skipif(
    LLAMA_SERVER is None, reason="llama-server is not built: run scripts/build-llama-cpp.sh (CI does)"
)


def test_health_answers_are_classified() -> None:
    # A llama-server worker answers as the embedded one does (rbee-worker in front of llama-server).
    assert classify_health("llama-server", 200, {"status": "busy", "queue": 1}) == "busy"
    assert classify_health("llama-server", 503, {"status": "loading"}) == "loading"
    # A bare llama-server (spawned by an older rbee-hive) in its own words.
    assert classify_health("llama-server", 200, {"status": "ok"}) == "ready"
    assert classify_health("llama-server", 503, {"error": {"code": 503, "message": "Loading model"}}) == "loading"
    assert classify_health("llama-server", 503, {"error": {"message": "no slot available"}}) == "busy"
    assert classify_health("llama-server", 500, {}) == "failed"
    assert classify_health("llama-cpp-python", 503, {"status": "loading"}) == "loading"
    assert classify_health("llama-cpp-python", 200, {"status": "busy", "queue": 2}) == "busy"


async def _greedy(url: str, engine: str) -> tuple[list[str], dict]:
    tokens: list[str] = []
    async with aiohttp.ClientSession() as session:
        async for ev in execute(
            session, url, engine, {"prompt": "Hello, how are you?", "max_tokens": 12, "temperature": 0.0, "seed": 42}
        ):
            if ev["event"] == "token":
                tokens.append(ev["t"])
            else:
                return tokens, ev
    raise AssertionError("no summary")


@needs_binary
async def test_llama_server_worker_lifecycle(hive) -> None:
    out = hive(*SPAWN_SERVER, str(LLAMA_SERVER), "--wait", "--json")
    assert out.returncode == 0, out.stderr
    server = json.loads(out.stdout.strip().splitlines()[-1])
    assert server["engine"] == "llama-server" and server["state"] == "ready"
    [listed] = json.loads(hive("worker", "list", "--json", check=True).stdout)["workers"]
    assert listed["engine"] == "llama-server" and listed["state"] == "ready"

    tokens, summary = await _greedy(server["url"], "llama-server")
    assert summary["tokens_generated"] == 12 and summary["finish_reason"] == "length"
    assert summary["prompt_tokens"] > 5 and summary["tokens_per_sec"] > 0 and summary["ttft_ms"] > 0
    assert summary["text"] == "".join(tokens)

    # The embedded engine runs the same llama.cpp: greedy decoding must give the same text.
    ours = json.loads(hive("worker", "spawn", "cpu", "--model", "tiny-test", "--wait", "--json", check=True).stdout)
    _, our_summary = await _greedy(ours["url"], "llama-cpp-python")
    assert our_summary["text"] == summary["text"]

    for w in (server, ours):
        result = json.loads(hive("worker", "stop", w["id"], "--json", check=True).stdout)
        assert result["stopped"] and not result["forced"]
        assert group_members(w["pid"]) == []


def test_missing_binary_is_a_clear_error(hive, tmp_path: Path) -> None:
    proc = hive(
        *SPAWN_SERVER,
        str(tmp_path / "nope"),
    )
    assert proc.returncode == 1 and "llama-server not found" in proc.stderr


@needs_binary
async def test_a_bare_llama_server_still_answers(tmp_path: Path) -> None:
    # A worker spawned by an older rbee-hive is llama-server alone: /execute falls back to its /completion.
    from tests.conftest import REPO_ROOT, wait_for
    from tests.e2e.test_worker_api import free_port, http  # here: that module imports this one

    port = free_port()
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [str(LLAMA_SERVER), "-m", str(REPO_ROOT / "fixtures" / "tiny-test.gguf"), "--port", str(port), "-c", "512"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: proc.poll() is not None or http("GET", f"{url}/health")[0] == 200, timeout=60)
        tokens, summary = await _greedy(url, "llama-server")
        assert summary["tokens_generated"] == 12 and summary["text"] == "".join(tokens)
    finally:
        proc.terminate()
        proc.wait(30)
