"""Talking to a worker of either engine (llama-cpp-python embedded, or llama.cpp's llama-server) with one vocabulary.

Both engines serve the same API: rbee-worker answers in front of llama-server too (worker/proxy.py). A bare
llama-server, which rbee-hive ran before that, still answers here in its own dialect: health answers become
loading/ready/busy, and a generation becomes token events and one summary with the same numbers
(`tokens_generated`, `prompt_tokens`, `ttft_ms`, `tokens_per_sec`, `finish_reason`).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

ENGINE_EMBEDDED = "llama-cpp-python"
ENGINE_SERVER = "llama-server"
ENGINES = (ENGINE_EMBEDDED, ENGINE_SERVER)


def classify_health(engine: str, status: int, body: Any) -> str:
    """loading, ready, busy or failed, from a /health answer of either engine."""
    if isinstance(body, dict) and body.get("status") in ("loading", "ready", "busy", "failed"):
        return str(body["status"])
    if engine == ENGINE_SERVER:  # a bare llama-server
        if status == 200:
            return "ready"
        message = ""
        if isinstance(body, dict):
            err = body.get("error")
            message = (err.get("message", "") if isinstance(err, dict) else str(err or "")).lower()
        # Some llama-server versions answer 503 when every slot is busy: alive, not dead.
        if status == 503 and "slot" in message:
            return "busy"
        return "loading" if status == 503 else "failed"
    return "ready" if status == 200 else "loading" if status == 503 else "failed"


def probe_health(base_url: str, engine: str, timeout: float = 0.5) -> tuple[str, dict[str, Any]]:
    """Ask a worker's /health synchronously: (`starting` when nothing listens yet, or the classified state, body)."""
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return "starting", {}
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        body = {}
    return classify_health(engine, status, body), body if isinstance(body, dict) else {}


def _summary_from_llama_server(final: dict[str, Any], ttft_ms: float, text: str) -> dict[str, Any]:
    timings = final.get("timings") or {}
    stop_type = final.get("stop_type") or ("limit" if final.get("stopped_limit") else "eos")
    finish = {"limit": "length", "eos": "stop", "word": "stop"}.get(stop_type, stop_type or "stop")
    return {
        "tokens_generated": int(timings.get("predicted_n", final.get("tokens_predicted", 0))),
        "prompt_tokens": int(timings.get("prompt_n", final.get("tokens_evaluated", 0))),
        "ttft_ms": round(ttft_ms, 3),
        "tokens_per_sec": round(float(timings.get("predicted_per_second", 0.0)), 2),
        "prompt_tokens_per_sec": round(float(timings.get("prompt_per_second", 0.0)), 2),
        "total_ms": round(float(timings.get("prompt_ms", 0.0)) + float(timings.get("predicted_ms", 0.0)), 3),
        "finish_reason": finish,
        "text": text,
    }


async def _sse_lines(resp: Any) -> AsyncIterator[tuple[str | None, str]]:
    event: str | None = None
    async for raw in resp.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            event = None
            continue
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            yield event, line[5:].strip()


async def _raise_for(resp: Any) -> None:
    if resp.status != 200:
        text = await resp.text()
        try:
            message = json.loads(text).get("error", text)
        except (ValueError, AttributeError):
            message = text
        if isinstance(message, dict):
            message = message.get("message", str(message))
        raise RuntimeError(f"worker answered {resp.status}: {message}")


async def execute(session: Any, base_url: str, engine: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Run one generation; yields `{"event": "token", "t": text}` per token, then `{"event": "done", ...summary}`.

    Raises RuntimeError with the worker's message on an error answer or an error event.
    """
    started = time.perf_counter()
    async with session.post(f"{base_url}/execute", json=body) as resp:
        if not (resp.status == 404 and engine == ENGINE_SERVER):
            await _raise_for(resp)
            async for event, data in _sse_lines(resp):
                doc = json.loads(data)
                if event == "token":
                    yield {"event": "token", "t": doc["t"], "id": doc.get("id")}
                elif event == "done":
                    yield {"event": "done", **doc}
                    return
                elif event == "error":
                    raise RuntimeError(doc.get("error", "generation failed"))
            raise RuntimeError("the worker closed the stream before the summary")
    # A bare llama-server (a worker spawned by an older rbee-hive): its own /completion route.
    payload = {
        "prompt": body["prompt"],
        "n_predict": body.get("max_tokens", 100),
        "temperature": body.get("temperature", 0.0),
        "stream": True,
        "cache_prompt": False,
    }
    if body.get("seed") is not None:
        payload["seed"] = body["seed"]
    async with session.post(f"{base_url}/completion", json=payload) as resp:
        await _raise_for(resp)
        first: float | None = None
        pieces: list[str] = []
        async for _event, data in _sse_lines(resp):
            doc = json.loads(data)
            if "error" in doc:
                raise RuntimeError(str(doc["error"]))
            if doc.get("content"):
                if first is None:
                    first = time.perf_counter()
                pieces.append(doc["content"])
                yield {"event": "token", "t": doc["content"]}
            if doc.get("stop"):
                ttft = ((first or time.perf_counter()) - started) * 1000.0
                yield {"event": "done", **_summary_from_llama_server(doc, ttft, "".join(pieces))}
                return
    raise RuntimeError("the worker closed the stream before the summary")
