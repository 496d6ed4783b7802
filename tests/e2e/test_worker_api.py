"""rbee-worker's HTTP API on the tiny model: health, /execute, OpenAI routes, queueing, cancel, bad input."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from rbee_tui.worker.client import execute
from tests.conftest import REPO_ROOT, wait_for

TINY = REPO_ROOT / "fixtures" / "tiny-test.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    except urllib.error.URLError:
        return 0, {}
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"raw": raw.decode()}


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rbee_tui.worker.launch",
            "--model",
            str(TINY),
            "--model-id",
            "tiny-test",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: proc.poll() is not None or http("GET", f"{url}/health")[0] == 200, timeout=60, interval=0.01)
    assert proc.poll() is None
    yield url
    proc.terminate()
    assert proc.wait(30) == 0, "SIGTERM must end the worker cleanly"


async def run(url: str, body: dict) -> tuple[list[str], dict]:
    tokens: list[str] = []
    async with aiohttp.ClientSession() as session:
        async for ev in execute(session, url, "llama-cpp-python", body):
            if ev["event"] == "token":
                tokens.append(ev["t"])
            else:
                return tokens, ev
    raise AssertionError("no summary")


def test_health_when_ready(worker: str) -> None:
    status, body = http("GET", f"{worker}/health")
    assert status == 200
    assert body["status"] == "ready" and body["model"] == "tiny-test" and body["backend"] == "cpu"
    assert body["n_ctx"] == 512 and isinstance(body["pid"], int)


async def test_execute_streams_tokens_and_a_summary(worker: str) -> None:
    tokens, summary = await run(
        worker, {"job_id": "t1", "prompt": "Hello, how are you?", "max_tokens": 10, "temperature": 0.0, "seed": 42}
    )
    assert summary["job_id"] == "t1"
    assert summary["tokens_generated"] == len(tokens) == 10
    assert summary["finish_reason"] == "length"
    assert summary["prompt_tokens"] > 5
    assert summary["ttft_ms"] > 0 and summary["tokens_per_sec"] > 0 and summary["prompt_tokens_per_sec"] > 0
    assert summary["text"] == "".join(tokens)


async def test_unicode_and_emoji_prompts(worker: str) -> None:
    for prompt in ["Grüße aus Köln — ça va? 你好 🐝🚀", "🐝" * 50, "\u200b\u0000 control"]:
        _tokens, summary = await run(worker, {"prompt": prompt, "max_tokens": 4})
        assert summary["tokens_generated"] == 4


async def test_warm_up_does_not_pollute_the_next_request(worker: str) -> None:
    """The seeds' cache bug: a request must not see what the one before it left in the KV cache."""
    real = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0.9, "seed": 1234}
    alone_tokens, alone = await run(worker, real)
    await run(
        worker,
        {
            "prompt": "The capital of France is Paris and the capital of Spain",
            "max_tokens": 30,
            "temperature": 0.7,
            "seed": 7,
        },
    )
    after_tokens, after = await run(worker, real)
    assert after_tokens == alone_tokens
    assert after["text"] == alone["text"]
    other_tokens, _ = await run(worker, {**real, "seed": 4321})
    assert other_tokens != alone_tokens, "the seed must matter, or this test proves nothing"


async def test_ten_concurrent_requests_run_in_arrival_order(worker: str) -> None:
    results = await asyncio.gather(
        *[run(worker, {"job_id": f"q{i}", "prompt": f"request number {i}", "max_tokens": 12}) for i in range(10)]
    )
    summaries = [s for _, s in results]
    assert sorted(s["job_id"] for s in summaries) == sorted(f"q{i}" for i in range(10))
    assert all(s["tokens_generated"] == 12 for s in summaries)
    by_arrival = sorted(summaries, key=lambda s: s["arrival_seq"])
    assert [s["started_seq"] for s in by_arrival] == sorted(s["started_seq"] for s in summaries)


async def test_busy_while_generating_then_cancel(worker: str) -> None:
    async with aiohttp.ClientSession() as session:
        stream = execute(session, worker, "llama-cpp-python", {"job_id": "long", "prompt": "go", "max_tokens": 500})
        first = await stream.__anext__()
        assert first["event"] == "token"
        queued = asyncio.create_task(run(worker, {"job_id": "waiting", "prompt": "next", "max_tokens": 500}))
        await asyncio.to_thread(wait_for, lambda: http("GET", f"{worker}/health")[1].get("queue") == 2, 10)
        status, health = http("GET", f"{worker}/health")
        assert status == 200 and health["status"] == "busy"
        assert http("POST", f"{worker}/cancel/waiting")[0] == 200
        assert http("POST", f"{worker}/cancel/long")[1]["cancelled"] is True
        rest = [ev async for ev in stream]
        assert rest[-1]["finish_reason"] == "cancelled"
        assert rest[-1]["tokens_generated"] < 500
        _, waiting = await queued
        assert waiting["finish_reason"] == "cancelled" and waiting["tokens_generated"] == 0
    assert http("POST", f"{worker}/cancel/nope")[0] == 404


async def test_openai_routes(worker: str) -> None:
    status, models = http("GET", f"{worker}/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny-test"
    status, body = http(
        "POST",
        f"{worker}/v1/completions",
        {"model": "tiny-test", "prompt": "Hi", "max_tokens": 5, "temperature": 0, "user": "x", "presence_penalty": 0},
    )
    assert status == 200 and body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 5 and isinstance(body["choices"][0]["text"], str)
    status, chat = http(
        "POST",
        f"{worker}/v1/chat/completions",
        {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "max_tokens": 6,
            "temperature": 0,
        },
    )
    assert status == 200 and chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] <= 6
    async with aiohttp.ClientSession() as session:
        for route, body in (
            ("completions", {"prompt": "Hi", "max_tokens": 5, "stream": True}),
            ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True}),
        ):
            async with session.post(f"{worker}/v1/{route}", json=body) as resp:
                assert resp.status == 200
                lines = [ln.decode().strip() async for ln in resp.content if ln.strip()]
            assert lines[-1] == "data: [DONE]"
            chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
            assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
            assert len(chunks) >= 2


BAD = [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"max_tokens": 5}, "prompt is required"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens must be at least 1"),
    ({"prompt": "hi", "max_tokens": -3}, "max_tokens must be at least 1"),
    ({"prompt": "hi", "max_tokens": 100000}, "max_tokens must be at most 512"),
    ({"prompt": "hi", "max_tokens": "10"}, "max_tokens must be an integer"),
    ({"prompt": "hi", "max_tokens": True}, "max_tokens must be an integer"),
    ({"prompt": 42}, "prompt must be a string"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature must be a number"),
    ({"prompt": "hi", "seed": -1}, "seed must be at least 0"),
    ({"prompt": "hi", "colour": "blue"}, "unknown field(s): colour"),
    ({"prompt": "word " * 2000, "max_tokens": 5}, "the context holds 512"),
]


@pytest.mark.parametrize(("body", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_input_gets_400_and_the_worker_stays_up(worker: str, body: bytes | dict, message: str) -> None:
    status, answer = http("POST", f"{worker}/execute", body)
    assert status == 400
    assert message in answer["error"]
    assert http("GET", f"{worker}/health")[0] == 200
    ok, _ = http("POST", f"{worker}/v1/completions", {"prompt": "still here?", "max_tokens": 2})
    assert ok == 200


def test_openai_bad_input(worker: str) -> None:
    status, body = http("POST", f"{worker}/v1/chat/completions", {"messages": "hi"})
    assert status == 400 and "messages must be a non-empty list" in body["error"]["message"]
    status, body = http("POST", f"{worker}/v1/completions", {"prompt": "x", "n": 3})
    assert status == 400 and "n must be" in body["error"]["message"]


async def test_health_is_503_loading_until_the_model_is_loaded() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from rbee_tui.worker.engines import LlamaCppEngine
    from rbee_tui.worker.server import Worker, build_app

    worker = Worker(LlamaCppEngine(str(TINY), "cpu", 0), "tiny-test", "w1")
    async with TestClient(TestServer(build_app(worker))) as client:
        resp = await client.get("/health")
        assert resp.status == 503 and (await resp.json())["status"] == "loading"
        resp = await client.post("/execute", json={"prompt": "hi"})
        assert resp.status == 503 and "loading" in (await resp.json())["error"]
        await worker.load()
        resp = await client.get("/health")
        body = await resp.json()
        assert resp.status == 200 and body["status"] == "ready" and body["n_ctx"] == 512
        worker.engine.close()


def test_bad_model_file_exits_with_one_line(tmp_path: Path) -> None:
    for content, reason in (
        (b"PK\x03\x04" + os.urandom(64), "not a GGUF file"),
        (TINY.read_bytes()[:100_000], "llama.cpp could not load"),
    ):
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(content)
        proc = subprocess.run(
            [sys.executable, "-m", "rbee_tui.worker.launch", "--model", str(bad), "--port", str(free_port())],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rbee-worker: error:") and reason in err[0]
        assert "Traceback" not in proc.stdout + proc.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "rbee_tui.worker.launch", "--model", str(tmp_path / "nope.gguf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
