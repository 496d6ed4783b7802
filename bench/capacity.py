"""The concurrency sweep on this machine: what batching buys. One generated model on the local pool, a matrix
cell per engine (the embedded one, which runs one request at a time, and llama-server with a slot per stream),
each swept at 1, 2 and 4 simultaneous streams by the real runner (`MatrixRunner` with `concurrency`). The
figure is each engine's aggregate tokens/s at 4 streams against its own at 1; medians over the rounds.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
from collections.abc import Iterator
from typing import Any

from bench.cases import isolated, model, row

MODEL = "bench-sweep"
LEVELS = (1, 2, 4)
ENGINES = ("llama-cpp-python", "llama-server")


async def _rounds(home: Any, rounds: int, max_tokens: int) -> dict[str, dict[int, list[float]]]:
    """Per engine and level, each round's aggregate tokens/s (and per-stream, under `engine per-stream`)."""
    from rbee_tui.config import PoolConfig
    from rbee_tui.matrix.plan import Cell
    from rbee_tui.matrix.scheduler import MatrixRunner
    from rbee_tui.matrix.store import Store
    from rbee_tui.matrix.sweep import split_backend, with_engines
    from rbee_tui.pools.client import PoolClient

    client = PoolClient(PoolConfig(name="local", models_dir=str(home / "local-models")))
    client.start()
    got: dict[str, dict[int, list[float]]] = {}
    try:
        await client.wait_connected(60)
        await client.hive("models", "register", MODEL, "--repo", "rbee-bench/sweep-GGUF", "--file", "m.gguf")
        async for _ in client.hive_stream("models", "download", MODEL):
            pass
        runner = MatrixRunner({"local": client}, home / "results.db", max_tokens=max_tokens, concurrency=LEVELS)
        for _ in range(rounds):
            run_id = await runner.run(with_engines([Cell(MODEL, "local", "cpu")], ENGINES))
            store = Store(home / "results.db")
            try:
                jobs = store.jobs(run_id)
            finally:
                store.close()
            for job in jobs:
                if job["state"] != "passed":
                    raise RuntimeError(f"{job['cell']}: {job['state']}: {job['reason']}")
                engine = split_backend(job["backend"])[1]
                for e in job["measurements"]["concurrency"]:
                    got.setdefault(engine, {}).setdefault(e["level"], []).append(e["aggregate_tps"])
                    got.setdefault(f"{engine} per-stream", {}).setdefault(e["level"], []).append(e["per_stream_tps"])
    finally:
        await client.close()
    return got


def capacity(smoke: bool) -> Iterator[dict[str, Any]]:
    """Aggregate tokens/s at 4 streams against 1, per engine: what continuous batching buys on this pool."""
    from tests.e2e.test_capacity_sweep import LLAMA_SERVER
    from tests.support.cleanup import kill_workers
    from tests.support.hub import HubServer

    if LLAMA_SERVER is None:
        return  # llama.cpp's llama-server is not built: nothing to compare
    os.environ["RBEE_LLAMA_SERVER"] = LLAMA_SERVER
    path = model("bench-85m", smoke)
    home = isolated()
    hub = HubServer().start()
    hub.add("rbee-bench/sweep-GGUF", "m.gguf", path=path)
    saved = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = hub.url
    rounds, max_tokens = (1, 8) if smoke else (int(os.environ.get("RBEE_BENCH_ROUNDS") or 3), 64)
    try:
        got = asyncio.run(_rounds(home, rounds, max_tokens))
    finally:
        hub.stop()
        kill_workers(home)
        shutil.rmtree(home, ignore_errors=True)
        if saved is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = saved
    size = f"{path.stat().st_size / 1e6:.0f} MB model, {max_tokens} tokens a stream"
    for engine in ("llama-server", "llama-cpp-python"):
        for what, key in (("aggregate", engine), ("per-stream", f"{engine} per-stream")):
            at = {level: statistics.median(v) for level, v in got[key].items()}
            yield row(
                f"sweep: {engine} {what} x4 vs x1",
                at[4],
                "t/s",
                "report",
                at[1],
                at[4] / at[1] if at[1] else None,
                detail=f"{size}; x2: {at[2]:.1f} t/s; " + ("4 slots" if engine == "llama-server" else "serialised"),
                runs=got[key][4],
                baseline_runs=got[key][1],
            )
