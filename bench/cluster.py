"""Clusters on this machine: one model over 1, 2 and 3 nodes, relayed through SSH or dialled directly, and its
load time with the nodes' tensor caches cold and warm. The real runtime throughout (`Cluster` over the local
pool and two sshd pools: ggml-rpc-server on each, the SSH relays, llama-server as the coordinator).

Each round spawns, measures and stops, in turn: three nodes with every tensor cache emptied (cold load), the
same three again (warm load), one node (the head alone: a plain llama-server, no RPC), two nodes relayed
through SSH, and the same two with the second node dialled directly (`rpc_host`, LAN mode). A measurement is
one completion of a fixed prompt with llama-server's own prompt and decode tokens/s; figures are medians over
the rounds.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.cases import CACHE, isolated, row, ssh_pool

PROMPT = "The quick brown fox jumps over the lazy dog. " * 12
MODEL = "bench-cluster"


def cluster_model(smoke: bool) -> Path:
    """A generated model whose feed-forward tensors pass llama.cpp RPC's 10 MiB hashing threshold, so the
    tensor cache applies to them (ggml/src/ggml-rpc/ggml-rpc.cpp: HASH_THRESHOLD); about 340 MB in f16."""
    from rbee_tui.tinymodel import TinySpec, write_model

    if smoke:
        spec = TinySpec(name="cluster smoke", n_layer=6, n_embd=64, n_ff=128, n_ctx=1024, seed=11)
        path = CACHE / "cluster-smoke.gguf"
    else:
        spec = TinySpec(
            name="cluster bench",
            n_embd=1536,
            n_layer=6,
            n_head=12,
            n_head_kv=12,
            n_ff=4096,
            n_ctx=1024,
            seed=5,
            f16=True,
        )
        path = CACHE / "cluster-340m.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_model(path, spec)
    return path


async def _complete(url: str, n_predict: int) -> dict[str, float]:
    """One greedy generation through the worker's /execute; llama-server's own prompt and decode tokens/s."""
    import aiohttp

    from rbee_tui.worker.client import execute

    body = {"prompt": PROMPT, "max_tokens": n_predict, "temperature": 0.0, "seed": 42}
    async with aiohttp.ClientSession() as session:
        async for ev in execute(session, url, "llama-server", body):
            if ev["event"] == "done":
                return {
                    "prefill": ev["prompt_tokens_per_sec"],
                    "decode": ev["tokens_per_sec"],
                    "n_prompt": ev["prompt_tokens"],
                    "n_gen": ev["tokens_generated"],
                }
    raise RuntimeError("the generation ended without a summary")


async def _rounds(pools: dict[str, Any], caches: list[Path], rounds: int, n_predict: int) -> dict[str, list[float]]:
    from rbee_tui.cluster.runtime import Cluster
    from rbee_tui.pools.client import PoolClient

    clients = {name: PoolClient(p) for name, p in pools.items()}
    for c in clients.values():
        c.start()
    got: dict[str, list[float]] = {}
    # Each node's rpc-server gets every core, as the single worker does (RBEE_BENCH_RPC_THREADS overrides).
    threads = int(os.environ.get("RBEE_BENCH_RPC_THREADS") or len(os.sched_getaffinity(0)))

    async def once(key: str, members: list[str], measure: bool = True) -> None:
        cluster = Cluster(clients, MODEL, members, policy="spread", ctx=1024, threads=threads, restarts=0)
        t0 = time.perf_counter()
        try:
            ready = await cluster.spawn()
            got.setdefault(f"{key} load_s", []).append(time.perf_counter() - t0)
            if measure:
                await _complete(ready["url"], 2)  # warm-up: first-use allocations are not the steady state
                await asyncio.sleep(0.3)  # llama.cpp's threads spin briefly after a request
                m = await _complete(ready["url"], n_predict)
                for k, v in m.items():
                    got.setdefault(f"{key} {k}", []).append(v)
        finally:
            await cluster.stop()

    try:
        await asyncio.gather(*(c.wait_connected(30) for c in clients.values()))
        local = clients["local"]
        await local.hive("models", "register", MODEL, "--repo", "rbee-bench/cluster-GGUF", "--file", "m.gguf")
        async for _ in local.hive_stream("models", "download", MODEL):
            pass
        for _ in range(rounds):
            for cache in caches:
                shutil.rmtree(cache, ignore_errors=True)
            await once("cold3", ["local", "node-a", "node-b"], measure=False)
            await once("warm3", ["local", "node-a", "node-b"], measure=False)
            await once("one", ["local"])
            await once("two", ["local", "node-a"])
            await once("three", ["local", "node-a", "node-b"])
            await once("direct2", ["local", "node-a-lan"])
    finally:
        await asyncio.gather(*(c.close() for c in clients.values()), return_exceptions=True)
    return got


def cluster(smoke: bool) -> Iterator[dict[str, Any]]:
    """Decode and prefill over 2 and 3 nodes vs one; SSH relay vs a direct link; load with cold vs warm caches."""
    from rbee_tui.config import PoolConfig
    from rbee_tui.errors import RbeeError
    from rbee_tui.hive.rpc import find_rpc_server
    from tests.support.cleanup import kill_workers
    from tests.support.hub import HubServer
    from tests.support.sshd import Sshd, environment_for, keygen, sshd_available

    if sshd_available():
        return
    try:
        find_rpc_server()
    except RbeeError:
        return  # llama.cpp's tools are not built: nothing to measure
    path = cluster_model(smoke)
    home = isolated()
    caches = [home / "cache-local"]
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(caches[0])  # the local node's tensor cache (its hive inherits this)
    hub = HubServer().start()
    hub.add("rbee-bench/cluster-GGUF", "m.gguf", path=path)
    os.environ["HF_ENDPOINT"] = hub.url
    key = keygen(home / "key")
    hive = str(Path(sys.executable).with_name("rbee-hive"))
    sshds = []
    pools: dict[str, Any] = {"local": PoolConfig(name="local", models_dir=str(home / "local-models"))}
    for name in ("node-a", "node-b"):
        cache = home / f"cache-{name}"
        caches.append(cache)
        env = {**environment_for(home / name, hub.url), "XDG_CACHE_HOME": str(cache)}
        sshd = Sshd(home / f"sshd-{name}", key, env=env).start()
        sshds.append(sshd)
        pools[name] = ssh_pool(name, sshd, key, home / name, hive)
    # The same node reached without the SSH relay: the head dials its rpc-server at the address it listens on.
    pools["node-a-lan"] = replace(pools["node-a"], name="node-a-lan", rpc_host="127.0.0.1")
    rounds, n_predict = (1, 8) if smoke else (int(os.environ.get("RBEE_BENCH_ROUNDS") or 5), 64)
    try:
        got = asyncio.run(_rounds(pools, [c / "rbee" / "rpc" for c in caches], rounds, n_predict))
    finally:
        for s in sshds:
            s.stop()
        hub.stop()
        kill_workers(home)
        shutil.rmtree(home, ignore_errors=True)
        if saved is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = saved
    med = {k: statistics.median(v) for k, v in got.items()}
    size = f"{path.stat().st_size / 1e6:.0f} MB model"
    for n, key in ((2, "two"), (3, "three")):
        for what in ("decode", "prefill"):
            figure, base = med[f"{key} {what}"], med[f"one {what}"]
            yield row(
                f"cluster: {what} over {n} nodes",
                figure,
                "t/s",
                "report",
                base,
                figure / base,
                detail=f"{size}; relayed through SSH; one node = llama-server alone",
                runs=got[f"{key} {what}"],
                baseline_runs=got[f"one {what}"],
            )
    for what in ("decode", "prefill"):
        figure, base = med[f"two {what}"], med[f"direct2 {what}"]
        yield row(
            f"cluster: SSH relay vs direct, {what}",
            figure,
            "t/s",
            "report",
            base,
            figure / base,
            detail="2 nodes; baseline: the second node dialled directly (rpc_host)",
            runs=got[f"two {what}"],
            baseline_runs=got[f"direct2 {what}"],
        )
    cold, warm = med["cold3 load_s"], med["warm3 load_s"]
    yield row(
        "cluster: load, warm vs cold cache",
        warm,
        "s",
        "warm < cold",
        cold,
        warm / cold,
        warm < cold,
        detail=f"3 nodes, spawn to ready; {size}",
        runs=got["warm3 load_s"],
        baseline_runs=got["cold3 load_s"],
    )
