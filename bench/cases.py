"""The benchmarks. Each returns result rows: name, figure, unit, baseline (same run), ratio, target, met."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("RBEE_BENCH_CACHE", Path.home() / ".cache" / "rbee" / "bench"))


def row(
    name: str,
    figure: float,
    unit: str,
    target: str,
    baseline: float | None = None,
    ratio: float | None = None,
    met: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "figure": figure,
        "unit": unit,
        "baseline": baseline,
        "ratio": ratio,
        "target": target,
        "met": met,
        **extra,
    }


def isolated() -> Path:
    """Fresh XDG dirs for this process: benchmarks never touch the user's config or models."""
    home = Path(tempfile.mkdtemp(prefix="rbee-bench-"))
    for var, sub in (("XDG_CONFIG_HOME", "c"), ("XDG_DATA_HOME", "d"), ("XDG_STATE_HOME", "s")):
        (home / sub).mkdir()
        os.environ[var] = str(home / sub)
    return home


def model(spec_name: str, smoke: bool) -> Path:
    """A generated model, cached between runs (the big one takes a few seconds to write)."""
    from rbee_tui.tinymodel import TINY_TEST, TinySpec, write_model

    if smoke:
        return (
            write_model(CACHE / "tiny.gguf", TINY_TEST) if not (CACHE / "tiny.gguf").exists() else CACHE / "tiny.gguf"
        )
    spec = TinySpec(
        name=spec_name, n_embd=768, n_layer=12, n_head=12, n_head_kv=12, n_ff=2048, n_ctx=1024, seed=1, f16=True
    )
    path = CACHE / f"{spec_name}.gguf"
    if not path.exists():
        write_model(path, spec)
    return path


# -- 1. worker overhead -------------------------------------------------------------------------------------


def _in_process(path: Path, n: int) -> tuple[float, float]:
    import llama_cpp

    from rbee_tui.worker.engines import LlamaCppEngine, Request

    engine = LlamaCppEngine(str(path), "cpu", 0, n_ctx=512)
    engine.load()
    times: list[float] = []
    t0 = time.perf_counter()
    summary = engine.generate(
        Request("Hello, how are you?", n, 0.0, 42),
        lambda t, i: times.append(time.perf_counter()),
        __import__("threading").Event(),
    )
    engine.close()
    del llama_cpp
    decode = (len(times) - 1) / (times[-1] - times[0])
    return decode, (times[0] - t0) * 1000.0 if summary else 0.0


async def _through_worker(url: str, n: int) -> tuple[float, float]:
    import aiohttp

    from rbee_tui.worker.client import execute

    times: list[float] = []
    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        async for ev in execute(
            session,
            url,
            "llama-cpp-python",
            {"prompt": "Hello, how are you?", "max_tokens": n, "temperature": 0.0, "seed": 42},
        ):
            if ev["event"] == "token":
                times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0]), (times[0] - t0) * 1000.0


def worker_overhead(smoke: bool) -> Iterator[dict[str, Any]]:
    from tests.e2e.test_worker_api import free_port, http

    path = model("bench-85m", smoke)
    n, reps = (16, 1) if smoke else (64, 5)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rbee_tui.worker.launch", "--model", str(path), "--port", str(port), "--n-ctx", "512"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while http("GET", f"{url}/health")[0] != 200:
            time.sleep(0.05)
        local, remote = [], []
        for _ in range(reps):  # interleaved, so both sides see the same machine
            local.append(_in_process(path, n))
            remote.append(asyncio.run(_through_worker(url, n)))
    finally:
        proc.terminate()
        proc.wait(30)
    tps_local = statistics.median(x[0] for x in local)
    tps_worker = statistics.median(x[0] for x in remote)
    ttft_local = statistics.median(x[1] for x in local)
    ttft_worker = statistics.median(x[1] for x in remote)
    yield row(
        "worker decode tok/s vs in-process",
        tps_worker,
        "t/s",
        ">= 95%",
        tps_local,
        tps_worker / tps_local,
        tps_worker / tps_local >= 0.95,
        params=path.stat().st_size // 2,
    )
    yield row(
        "worker TTFT overhead",
        ttft_worker - ttft_local,
        "ms",
        "<= 5 ms",
        ttft_local,
        None,
        ttft_worker - ttft_local <= 5.0,
    )
    bench_bin = sorted(glob.glob(str(Path.home() / ".cache/rbee/llama.cpp/*/bin/llama-bench")))
    if bench_bin and not smoke:
        out = subprocess.run(
            [bench_bin[-1], "-m", str(path), "-p", "0", "-n", str(n), "-r", "3", "-t", "2", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        tg = json.loads(out.stdout)[0]["avg_ts"]
        yield row(
            "worker decode tok/s vs llama-bench tg",
            tps_worker,
            "t/s",
            ">= 90%",
            tg,
            tps_worker / tg,
            tps_worker / tg >= 0.90,
        )


# -- 2. readiness -------------------------------------------------------------------------------------------


def readiness(smoke: bool) -> Iterator[dict[str, Any]]:
    from datetime import datetime

    from rbee_tui.catalog import CatalogStore
    from rbee_tui.hive.workers import Registry, spawn, stop, wait_ready

    isolated()
    store = CatalogStore(Path(os.environ["XDG_DATA_HOME"]) / "models", "bench")
    registry = Registry("bench")
    gaps = []
    for _ in range(1 if smoke else 7):
        record = spawn(store, registry, "cpu", "tiny-test")
        wait_ready(record)
        known = time.time()
        # The log of a worker id is appended to across spawns: this spawn's line is the last one.
        line = [ln for ln in Path(record.log).read_text().splitlines() if "model loaded" in ln][-1]
        loaded = datetime.strptime(line.split(" ")[0], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC).timestamp()
        gaps.append((known - loaded) * 1000.0)
        stop(registry, record.id)
    gap = statistics.median(gaps)
    yield row("readiness: loaded -> known ready", gap, "ms", "<= 100 ms", 10000.0, 10000.0 / gap, gap <= 100.0)


# -- 4. remote command latency ------------------------------------------------------------------------------


def remote_latency(smoke: bool) -> Iterator[dict[str, Any]]:
    import getpass

    from rbee_tui.config import PoolConfig
    from rbee_tui.pools.client import PoolClient
    from tests.support.sshd import Sshd, environment_for, keygen, sshd_available

    if sshd_available():
        return
    home = isolated()
    key = keygen(home / "key")
    sshd = Sshd(home / "sshd", key, env=environment_for(home / "node")).start()
    hive = str(Path(sys.executable).with_name("rbee-hive"))
    pool = PoolConfig(
        name="bench",
        transport="ssh",
        host="127.0.0.1",
        port=sshd.port,
        user=getpass.getuser(),
        identity_file=str(key),
        known_hosts=str(sshd.known_hosts),
        models_dir=str(home / "node" / "models"),
        hive_command=hive,
    )
    n = 3 if smoke else 15

    async def persistent() -> list[float]:
        client = PoolClient(pool)
        client.start()
        await client.wait_connected(30)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await client.hive("models", "catalog")
            out.append(time.perf_counter() - t0)
        await client.close()
        return out

    try:
        ours = statistics.median(asyncio.run(persistent())) * 1000.0
        fresh = []
        cmd = [
            "ssh",
            "-i",
            str(key),
            "-p",
            str(sshd.port),
            "-o",
            f"UserKnownHostsFile={sshd.known_hosts}",
            "-o",
            "BatchMode=yes",
            f"{getpass.getuser()}@127.0.0.1",
            hive,
            "--pool-id",
            "bench",
            "--models-dir",
            pool.models_dir,
            "models",
            "catalog",
            "--json",
        ]
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True, timeout=60)
            fresh.append(time.perf_counter() - t0)
        seed = statistics.median(fresh) * 1000.0
    finally:
        sshd.stop()
    yield row("remote catalog: persistent conn", ours, "ms", ">= 5x faster", seed, seed / ours, seed / ours >= 5)


# -- 5. metrics cost ----------------------------------------------------------------------------------------


def metrics(smoke: bool) -> Iterator[dict[str, Any]]:
    import psutil

    from rbee_tui.hive.metrics import Sampler

    isolated()
    sampler = Sampler("bench")
    costs = []
    for _ in range(3 if smoke else 60):
        t0 = time.process_time()
        sampler.sample()
        costs.append((time.process_time() - t0) * 1000.0)
    cost = statistics.median(costs)
    # The floor: the same psutil readings with nothing else (no NVML, no workers, no JSON).
    floor = []
    for _ in range(3 if smoke else 60):
        t0 = time.process_time()
        psutil.virtual_memory()
        psutil.swap_memory()
        psutil.cpu_percent(percpu=True)
        psutil.disk_io_counters()
        psutil.net_io_counters()
        floor.append((time.process_time() - t0) * 1000.0)
    yield row(
        "metrics: CPU per sample",
        cost,
        "ms",
        "(report)",
        statistics.median(floor),
        cost / max(statistics.median(floor), 1e-6),
    )
    yield row("metrics: agent CPU at 1 Hz", cost / 10.0, "%", "<= 0.5% of a core", None, None, cost / 10.0 <= 0.5)


# -- 7. downloads -------------------------------------------------------------------------------------------


def downloads(smoke: bool) -> Iterator[dict[str, Any]]:
    from huggingface_hub import hf_hub_download

    from rbee_tui.catalog import CatalogStore, new_entry
    from rbee_tui.hive.downloads import download
    from rbee_tui.tinymodel import TinySpec, write_model
    from tests.support.hub import HubServer

    size_spec = TinySpec(
        name="dl",
        n_embd=1024 if not smoke else 256,
        n_layer=12 if not smoke else 2,
        n_ff=4096,
        n_head=16,
        n_head_kv=16,
        seed=3,
    )
    path = CACHE / f"download-{'smoke' if smoke else 'full'}.gguf"
    if not path.exists():
        write_model(path, size_spec)
    hub = HubServer().start()
    hub.add("bench/dl", "m.gguf", path=path)
    ours, theirs = [], []
    try:
        for _ in range(1 if smoke else 5):
            home = isolated()
            store = CatalogStore(home / "models", "bench")
            with store.edit() as cat:
                cat.put(new_entry(store.models_dir, "m", repo="bench/dl", file="m.gguf"))
            t0 = time.perf_counter()
            download(store, "m", hub.url)
            ours.append(path.stat().st_size / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            hf_hub_download("bench/dl", "m.gguf", local_dir=str(home / "plain"), endpoint=hub.url)
            theirs.append(path.stat().st_size / (time.perf_counter() - t0))
    finally:
        hub.stop()
    a, b = statistics.median(ours), statistics.median(theirs)
    yield row(
        f"download {path.stat().st_size / 1e6:.0f} MB vs hf_hub_download",
        a / 1e6,
        "MB/s",
        ">= 95%",
        b / 1e6,
        a / b,
        a / b >= 0.95,
    )


ALL: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {
    "worker": worker_overhead,
    "readiness": readiness,
    "remote": remote_latency,
    "metrics": metrics,
    "downloads": downloads,
}
