"""`rbee-tui gateway` as a user runs it, and who may call it: loopback by default, a key anywhere else, bodies
of bounded size."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest

from rbee_tui.config import GatewayConfig
from rbee_tui.errors import RbeeError
from rbee_tui.gateway.auth import KEY_ENV
from rbee_tui.gateway.service import Gateway
from tests.conftest import json_lines, wait_for
from tests.e2e.test_worker_api import free_port

KEY = "sk-rbee-test-0123456789"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rbee_tui.cli", *args]


def test_off_loopback_without_a_key_is_refused_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(RbeeError, match=r"would listen on 0\.0\.0\.0 without an API key"):
        Gateway(dict, GatewayConfig(listen="0.0.0.0:0"))
    cfg = tmp_path / "config.toml"
    cfg.write_text('[gateway]\nlisten = "0.0.0.0:8080"\n')
    proc = subprocess.run(cli("--config", str(cfg), "gateway"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "rbee-tui: error: the gateway would listen on 0.0.0.0 without an API key" in proc.stderr
    assert f"gateway.api_key in the config file, or {KEY_ENV}" in proc.stderr
    proc = subprocess.run(cli("gateway", "--listen", "nonsense"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "--listen must be HOST:PORT, got 'nonsense'" in proc.stderr


@pytest.fixture
async def guarded(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    """A gateway on every address, with its key from the environment and a small body limit (no pools)."""
    monkeypatch.setenv(KEY_ENV, KEY)
    gw = Gateway(dict, GatewayConfig(listen="0.0.0.0:0", api_key="not-this-one", max_body=4096))
    await gw.start()
    yield gw
    await gw.close()


async def test_with_a_key_every_request_without_it_gets_401_and_nothing_else(guarded: Gateway) -> None:
    url = f"http://127.0.0.1:{guarded.port}"
    async with aiohttp.ClientSession() as s:
        for method, path in (("GET", "/v1/models"), ("GET", "/state"), ("GET", "/health"), ("POST", "/v1/completions")):
            for headers in ({}, {"Authorization": "Bearer not-this-one"}, {"Authorization": f"Basic {KEY}"}):
                async with s.request(method, url + path, headers=headers, json={"model": "x", "prompt": "y"}) as r:
                    assert r.status == 401, (path, headers)
                    assert r.headers["WWW-Authenticate"] == "Bearer"
                    assert await r.json() == {
                        "error": {
                            "message": "missing or wrong API key (Authorization: Bearer KEY)",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "invalid_api_key",
                        }
                    }
        async with s.get(f"{url}/state", headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 200 and (await r.json())["gateway"]["auth"] is True
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    listed = await openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).models.list()
    assert listed.data == []  # no pools: nothing to offer, but the key let it through


async def test_a_body_past_max_body_is_refused_with_413(guarded: Gateway) -> None:
    url = f"http://127.0.0.1:{guarded.port}"
    body = {"model": "tiny-test", "prompt": "x" * 5000}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s,
        s.post(f"{url}/v1/completions", json=body) as r,
    ):
        assert r.status == 413
        assert (await r.json())["error"]["message"].startswith("the body is larger than 4096 bytes")


def test_the_headless_gateway_serves_starts_a_worker_and_stops_it_on_the_way_out(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[gateway]\nlisten = "127.0.0.1:{port}"\nidle_stop = 600\n')
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cli("--config", str(cfg), "gateway", "--json"), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or b"Listening" in log.read_bytes(), 60, what="the gateway")
        assert proc.poll() is None, log.read_text()
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = oa.completions.create(model="tiny-test", prompt="Hello", max_tokens=5, temperature=0)
        assert answer.usage is not None and answer.usage.completion_tokens == 5
        events = json_lines(log.read_text())
        assert events[0] == {"event": "Listening", "url": f"http://127.0.0.1:{port}"}
        [started] = [e for e in events if e["event"] == "WorkerStarted"]
        assert started["model"] == "tiny-test" and started["where"].endswith(" on local")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = [e for e in json_lines(log.read_text()) if e["event"] == "WorkerStopped"]
    assert [(e["model"], e["why"]) for e in stopped] == [("tiny-test", "the gateway stopped")]
    workers = subprocess.run(
        [sys.executable, "-m", "rbee_tui.hive.cli", "worker", "list", "--json"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=60,
    )
    assert [w for w in json_lines(workers.stdout)[-1]["workers"] if w["state"] != "exited"] == []
