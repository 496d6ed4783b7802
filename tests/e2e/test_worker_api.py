"""rbee-worker's HTTP API on the tiny model, for both engines: health, /execute, OpenAI routes, queueing, cancel,
bad input, and characters of several bytes in streams."""

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

from rbee_tui.tinymodel import TINY_BYTES, write_model
from rbee_tui.worker.client import ENGINE_EMBEDDED as EMBEDDED
from rbee_tui.worker.client import ENGINE_SERVER as SERVER
from rbee_tui.worker.client import execute
from tests.conftest import REPO_ROOT, wait_for
from tests.e2e.test_llama_server import LLAMA_SERVER

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


@pytest.fixture(scope="module", params=[EMBEDDED, SERVER])
def worker(request: pytest.FixtureRequest) -> Iterator[str]:
    """A worker on tiny-test, once per engine: both serve the same API."""
    port = free_port()
    argv = [sys.executable, "-m", "rbee_tui.worker.launch", "--model", str(TINY), "--model-id", "tiny-test"]
    if request.param == SERVER:
        if LLAMA_SERVER is None:
            pytest.skip("llama-server is not built: run scripts/build-llama-cpp.sh (CI does)")
        argv += ["--engine", "llama-server", "--llama-server", LLAMA_SERVER]
    proc = subprocess.Popen([*argv, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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


# -- characters of several bytes, written a byte per token ------------------------------------------------


@pytest.fixture(scope="module", params=[EMBEDDED, SERVER])
def bytes_worker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A worker on tiny-bytes, which answers "é🐝é🐝..." a byte per token, once per engine."""
    model = write_model(tmp_path_factory.mktemp("models") / "tiny-bytes.gguf", TINY_BYTES)
    port = free_port()
    argv = [sys.executable, "-m", "rbee_tui.worker.launch", "--model", str(model), "--port", str(port)]
    if request.param == SERVER:
        if LLAMA_SERVER is None:
            pytest.skip("llama-server is not built: run scripts/build-llama-cpp.sh (CI does)")
        argv += ["--engine", "llama-server", "--llama-server", LLAMA_SERVER]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: proc.poll() is not None or http("GET", f"{url}/health")[0] == 200, timeout=60)
    yield url
    proc.terminate()
    proc.wait(30)


async def _stream(url: str, route: str, body: dict) -> list[dict]:
    async with aiohttp.ClientSession() as session, session.post(f"{url}{route}", json=body) as resp:
        assert resp.status == 200
        lines = [ln.decode().strip() async for ln in resp.content if ln.strip()]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


async def test_a_character_is_never_split_across_events(bytes_worker: str) -> None:
    # 12 tokens: 🐝 (4 bytes) and é (2 bytes), twice. Each event carries whole characters or nothing.
    tokens, summary = await run(bytes_worker, {"prompt": "Hello é", "max_tokens": 12})
    assert summary["tokens_generated"] == len(tokens) == 12
    assert "".join(tokens) == summary["text"] == "🐝é🐝é"
    assert set(tokens) == {"", "🐝", "é"}
    for route, body, pick in (
        ("/v1/completions", {"prompt": "Hello é"}, lambda c: c["text"]),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, lambda c: c["delta"]["content"]),
    ):
        whole = http("POST", f"{bytes_worker}{route}", {**body, "max_tokens": 12, "temperature": 0})[1]
        chunks = await _stream(bytes_worker, route, {**body, "max_tokens": 12, "temperature": 0, "stream": True})
        pieces = [
            pick(c["choices"][0]) or "" for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is None
        ]
        answer = whole["choices"][0].get("text") or whole["choices"][0]["message"]["content"]
        assert "".join(pieces) == answer and answer in ("🐝é🐝é", "é🐝é🐝")
        assert all(p in ("", "é", "🐝") for p in pieces), pieces


async def test_schema_constants_keep_characters_beyond_the_bmp(bytes_worker: str) -> None:
    # A constant is written as JSON text, whatever characters it holds: no surrogate halves, no U+FFFD.
    values = ["é你好🐝", 'a "quoted" \\ back\nslash']
    fmt = {"type": "json_schema", "json_schema": {"name": "v", "schema": {"enum": values}}}
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 60, "response_format": fmt}
    seen = set()
    for seed in range(6):
        status, whole = http("POST", f"{bytes_worker}/v1/chat/completions", {**body, "seed": seed})
        assert status == 200, whole
        seen.add(json.loads(whole["choices"][0]["message"]["content"]))
        chunks = await _stream(bytes_worker, "/v1/chat/completions", {**body, "seed": seed, "stream": True})
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert json.loads(streamed) in values and "\ufffd" not in streamed
    assert seen <= set(values) and seen
