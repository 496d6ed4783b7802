"""A cell's concurrency sweep: N simultaneous streams against one worker per level, and what each level gave.

Each level starts its streams together and waits for all of them. What a level records is what its clients
saw: time to first token from the moment the request was sent (so a request that waits behind others counts
its wait), each stream's tokens over its own time from request to last token, and the aggregate: every token
of the level over the level's wall time. A worker that serialises requests (the embedded engine) shows a flat
aggregate and a per-stream speed that falls with N; one that batches them (llama-server with --parallel N)
shows the aggregate rise.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rbee_tui.errors import RbeeError
from rbee_tui.worker.client import ENGINE_EMBEDDED, ENGINE_SERVER, ENGINES, execute

ENGINE_SEP = "/"  # a column's backend names its engine after this: cpu/llama-server (the embedded one: plain cpu)
SHORT = {ENGINE_EMBEDDED: "", ENGINE_SERVER: "llama-server"}


def engine_label(backend: str, engine: str) -> str:
    """The backend as a matrix column names it: `cpu` for the embedded engine, `cpu/llama-server` otherwise."""
    return f"{backend}{ENGINE_SEP}{engine}" if engine != ENGINE_EMBEDDED else backend


def split_backend(label: str) -> tuple[str, str]:
    """`cpu/llama-server` -> ("cpu", "llama-server"); `cpu` -> ("cpu", the embedded engine)."""
    backend, _, engine = label.partition(ENGINE_SEP)
    if engine and engine not in ENGINES:
        raise RbeeError(f"unknown engine {engine!r} in column {label!r}", f"choose from {', '.join(ENGINES)}")
    return backend, engine or ENGINE_EMBEDDED


def with_engines(cells: list[Any], engines: tuple[str, ...] | list[str]) -> list[Any]:
    """Each plain cell once per engine (its backend relabelled `cpu/llama-server`), engine by engine; cluster
    cells as they are. No engines: the cells as they are (the embedded engine)."""
    from dataclasses import replace

    if not engines or list(engines) == [ENGINE_EMBEDDED]:
        return list(cells)
    out = []
    for engine in engines:
        out += [replace(c, backend=engine_label(c.backend, engine)) for c in cells if not c.is_cluster]
    return out + [c for c in cells if c.is_cluster]


def spawn_args(engine: str, levels: tuple[int, ...] | list[int]) -> list[str]:
    """`rbee-hive worker spawn` arguments for a cell's engine: llama-server gets one slot per stream of the
    highest level (continuous batching across them); the embedded engine runs one request at a time."""
    if engine != ENGINE_SERVER:
        return []
    return ["--engine", ENGINE_SERVER, f"--server-args=--parallel {worker_parallel(engine, levels)}"]


def worker_parallel(engine: str, levels: tuple[int, ...] | list[int]) -> int:
    """How many requests the cell's worker runs at once: the embedded engine serialises them."""
    return max([1, *levels]) if engine == ENGINE_SERVER else 1


@dataclass(frozen=True)
class Stream:
    """One request of a level, as its client saw it."""

    tokens: int
    ttft_ms: float  # from sending the request to its first token, waiting included
    seconds: float  # from sending the request to its last token
    error: str = ""

    @property
    def tps(self) -> float:
        """Tokens per second over the stream's own time."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks, as numpy's default does."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def _stream(session: Any, url: str, engine: str, body: dict[str, Any]) -> Stream:
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    try:
        async for ev in execute(session, url, engine, body):
            if ev["event"] == "token":
                last = time.perf_counter()
                first = first or last
                tokens += 1
            elif ev["event"] == "done":
                # The worker's own count (a token event may carry more than one token's text).
                tokens = int(ev.get("tokens_generated", tokens))
    except Exception as exc:  # one stream's failure is data: the level says how many streams failed and why
        return Stream(tokens, 0.0, 0.0, str(exc) or type(exc).__name__)
    if not tokens:
        return Stream(0, 0.0, 0.0, "no tokens were generated")
    return Stream(tokens, (first - started) * 1000.0, (last or time.perf_counter()) - started)


async def measure_level(
    url: str, engine: str, level: int, parallel: int, prompt: str, max_tokens: int, seed: int
) -> dict[str, Any]:
    """Run `level` simultaneous streams against the worker at `url`; the level's entry of `concurrency`."""
    import aiohttp

    bodies = [
        {
            "job_id": f"sweep-{level}-{i}-{uuid.uuid4().hex[:8]}",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "seed": seed + i,
        }
        for i in range(level)
    ]
    # One connection per stream: a shared pool's limit must not be what serialises them.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        t0 = time.perf_counter()
        streams = await asyncio.gather(*(_stream(session, url, engine, b) for b in bodies))
        wall = time.perf_counter() - t0
    ok = [s for s in streams if not s.error]
    total = sum(s.tokens for s in ok)
    entry: dict[str, Any] = {
        "level": level,
        "streams_ok": len(ok),
        "aggregate_tps": round(total / wall, 2) if wall > 0 else 0.0,
        "per_stream_tps": round(statistics.median(s.tps for s in ok), 2) if ok else 0.0,
        "ttft_p50_ms": round(percentile([s.ttft_ms for s in ok], 50), 1),
        "ttft_p95_ms": round(percentile([s.ttft_ms for s in ok], 95), 1),
        "engine": engine,
        "parallel": parallel,
        "tokens": total,
        "wall_s": round(wall, 3),
    }
    errors = list(dict.fromkeys(s.error for s in streams if s.error))
    if errors:
        entry["errors"] = errors[:3]
    return entry


async def sweep(
    url: str,
    engine: str,
    levels: tuple[int, ...] | list[int],
    *,
    parallel: int,
    prompt: str,
    max_tokens: int,
    seed: int,
    on_level: Callable[[list[dict[str, Any]]], None],
) -> list[dict[str, Any]]:
    """Every level in ascending order; `on_level` hears the list so far after each (to store it at once).
    A level where a stream failed ends the sweep with an RbeeError naming it, after it is recorded."""
    done: list[dict[str, Any]] = []
    for level in sorted(set(levels)):
        entry = await measure_level(url, engine, level, parallel, prompt, max_tokens, seed)
        done.append(entry)
        on_level(list(done))
        if entry["streams_ok"] < level:
            why = "; ".join(entry.get("errors", [])) or "no tokens"
            raise RbeeError(f"concurrency {level}: {level - entry['streams_ok']} of {level} streams failed: {why}")
    return done
