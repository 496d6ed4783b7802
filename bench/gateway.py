"""The gateway's cost: what `rbee-tui gateway` adds to a stream against calling the same worker directly, and the
short completions it routes per second for 16 concurrent clients.

The gateway runs as a user runs it (`rbee-tui gateway`, its own process) over the local pool; its first request
of each model starts the worker on demand, and then each measurement calls that worker both ways, interleaved:
through the gateway's port and directly on the worker's. A stream is read by a bare socket client (as in the
worker benchmark: a Python SSE parser on 2 cores would take its CPU from the decode threads); time to first
token is to the first `data: {` event, decode tokens/s from the first to the last event; each figure is the
median over pairs run back to back (a difference, or a ratio, per pair). The relay's own cost is measured once
more with tiny-test, whose work is next to nothing, so that the gateway's hop is not lost in the model's
prompt time. The completions per second are whole answers of 2 tokens from tiny-test, 16 clients each sending
its next request as the last one returns, over keep-alive connections, in windows of 4 s taken in turn.

Two layouts, each with a gateway of its own: everything on the machine's cores as the kernel schedules it (the
gateway beside the local pool's worker, taking CPU from its decode threads), and pinned as the gateway is meant
to run, on the dashboard's machine in front of workers on nodes: the gateway and the clients on core 0, the
pool's rbee-hive and so its workers on core 1 (two one-core machines, as the matrix benchmark pins its pools).

"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from bench.cases import SETTLE_S, isolated, model, row, timed_stream

PROMPT = "Hello, how are you?"
MODEL = "bench-85m"


def _hive(*args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "rbee_tui.hive.cli", *args, "--json"], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"rbee-hive {' '.join(args)}: {done.stderr or done.stdout}")
    return json.loads(done.stdout.splitlines()[-1])


def _stream(port: int, model_id: str, n: int) -> tuple[float, float]:
    """A greedy completion of `n` tokens streamed from 127.0.0.1:`port`: (time to first token ms, decode t/s)."""
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "seed": 42, "stream": True}
    t0, times, stream = timed_stream(port, "/v1/completions", body, b"data: {")
    if b"data: [DONE]" not in stream or len(times) < 2:
        raise RuntimeError(f"the stream from port {port} did not end well: {stream[-300:]!r}")
    # Every token in one read (a short smoke run): count to the stream's end instead, which is later by the close.
    last = times[-1] if times[-1] > times[0] else time.perf_counter()
    decode = (len(times) - 1) / (last - times[0])
    return (times[0] - t0) * 1000.0, decode


async def _rate(port: int, model_id: str, clients: int, seconds: float) -> float:
    """Whole completions per second that `clients` concurrent clients get from 127.0.0.1:`port`."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": model_id, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    done = 0
    stop_at = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            async with session.post(url, json=body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"port {port} answered {resp.status}")
            done += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return done / (time.monotonic() - t0)


def _worker_port(model_id: str, cores: set[int] | None = None) -> int:
    """The port of the one worker of `model_id` (checked to run on `cores` when given)."""
    workers = [w for w in _hive("worker", "list")["workers"] if w["model"] == model_id and w["state"] != "exited"]
    if len(workers) != 1:
        raise RuntimeError(f"expected one worker of {model_id}, found {workers}")
    if cores is not None and set(psutil.Process(workers[0]["worker_pid"]).cpu_affinity()) != cores:
        raise RuntimeError(f"the worker of {model_id} is not pinned to cores {cores}")
    return int(workers[0]["port"])


def _start_gateway(home: Path, port: int, pinned: bool) -> tuple[subprocess.Popen[bytes], Path]:
    """`rbee-tui gateway` over the local pool; pinned: the gateway (and this client) on core 0, the pool's
    rbee-hive and so its workers on core 1, as a dashboard machine and a node of one core each."""
    hive = str(Path(sys.executable).with_name("rbee-hive"))
    cfg = home / f"config-{'pinned' if pinned else 'shared'}.toml"
    pool = f'[[pools]]\nname = "local"\ntransport = "local"\nhive_command = "taskset -c 1 {hive}"\n' if pinned else ""
    cfg.write_text(f'[gateway]\nlisten = "127.0.0.1:{port}"\nidle_stop = 0\n\n{pool}')
    log = home / f"gateway-{'pinned' if pinned else 'shared'}.log"
    argv = [sys.executable, "-m", "rbee_tui.cli", "--config", str(cfg), "gateway", "--json"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(["taskset", "-c", "0", *argv] if pinned else argv, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while b"Listening" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc, log


def _stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # it stops the workers it started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _measure(home: Path, smoke: bool, pinned: bool, clients: int) -> dict[str, Any]:
    """Every figure of one layout: streams both ways, the tiny-test hop, the completions per second."""
    from tests.e2e.test_worker_api import free_port

    n, reps, window = (64, 2, 1.0) if smoke else (64, 30, 4.0)  # fewer tokens can arrive in one read: no decode
    port = free_port()
    mine = os.sched_getaffinity(0)
    proc, _ = _start_gateway(home, port, pinned)
    try:
        if pinned:
            os.sched_setaffinity(0, {0})  # the client is on the gateway's machine
        for m in (MODEL, "tiny-test"):  # the first request of each starts its worker on demand
            _stream(port, m, 4)
        direct = _worker_port(MODEL, {1} if pinned else None)
        through: list[tuple[float, float]] = []
        straight: list[tuple[float, float]] = []
        gateway_cpu = 0.0  # the gateway process's CPU seconds while it relayed the streams (health polls included)
        me = psutil.Process(proc.pid)
        for i in range(reps):  # interleaved, each side first in turn: both see the same machine
            for side in ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct"):
                time.sleep(SETTLE_S)  # llama.cpp's threads spin a little after a generation: not the next side's
                if side == "direct":
                    straight.append(_stream(direct, MODEL, n))
                else:
                    cpu0 = sum(me.cpu_times()[:2])
                    through.append(_stream(port, MODEL, n))
                    gateway_cpu += sum(me.cpu_times()[:2]) - cpu0
        tiny = _worker_port("tiny-test", {1} if pinned else None)
        # The relay's own cost, with a model whose work is next to nothing: 4 tokens of tiny-test each way.
        hops: list[float] = []
        tiny_direct: list[float] = []
        for i in range(2 if smoke else 40):
            first, second = (tiny, port) if i % 2 == 0 else (port, tiny)
            a, b = _stream(first, "tiny-test", 4)[0], _stream(second, "tiny-test", 4)[0]
            direct_ms, gateway_ms = (a, b) if first == tiny else (b, a)
            tiny_direct.append(direct_ms)
            hops.append(gateway_ms - direct_ms)
        rates: dict[str, list[float]] = {"gateway": [], "direct": []}
        for i in range(1 if smoke else 6):
            for side in ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct"):
                rates[side].append(asyncio.run(_rate(tiny if side == "direct" else port, "tiny-test", clients, window)))
    finally:
        os.sched_setaffinity(0, mine)
        _stop_gateway(proc)
    return {
        "through": through,
        "straight": straight,
        "cpu_per_token": gateway_cpu / (len(through) * n),
        "hops": hops,
        "tiny_direct": tiny_direct,
        "rates": rates,
    }


def _rows(m: dict[str, Any], where: str, clients: int) -> Iterator[dict[str, Any]]:
    pairs = list(zip(m["through"], m["straight"], strict=True))
    gaps = sorted(round(t[0] - s[0], 2) for t, s in pairs)
    added = statistics.median(gaps)
    ttft = statistics.median(s[0] for s in m["straight"])
    yield row(f"gateway{where}: TTFT added", added, "ms", "<= 5 ms", ttft, None, added <= 5.0, spread=gaps)
    hops = sorted(round(h, 2) for h in m["hops"])
    hop = statistics.median(hops)
    base = statistics.median(m["tiny_direct"])
    yield row(f"gateway{where}: TTFT added, tiny-test", hop, "ms", "<= 5 ms", base, None, hop <= 5.0, spread=hops)
    yield row(f"gateway{where}: CPU per relayed token", m["cpu_per_token"] * 1e6, "us", "report")
    tps_gw = statistics.median(t[1] for t in m["through"])
    tps_direct = statistics.median(s[1] for s in m["straight"])
    # The median of each pair's ratio: a pair ran back to back, so a machine that got busier between two pairs
    # (other jobs) moves both of its sides, not one.
    ratios = sorted(round(t[1] / s[1], 3) for t, s in pairs)
    ratio = statistics.median(ratios)
    yield row(f"gateway{where}: decode tok/s", tps_gw, "t/s", ">= 97%", tps_direct, ratio, ratio >= 0.97, spread=ratios)
    rates = m["rates"]
    rps_gw, rps_direct = statistics.median(rates["gateway"]), statistics.median(rates["direct"])
    rate_ratio = statistics.median(g / d for g, d in zip(rates["gateway"], rates["direct"], strict=True))
    yield row(
        f"gateway{where}: completions/s, {clients} clients",
        rps_gw,
        "r/s",
        "report",
        rps_direct,
        rate_ratio,
        None,
        spread={k: [round(v, 1) for v in vs] for k, vs in rates.items()},
    )


def gateway(smoke: bool) -> Iterator[dict[str, Any]]:
    from tests.support.cleanup import kill_workers
    from tests.support.hub import HubServer

    home = isolated()
    path = model(MODEL, smoke)
    clients = 4 if smoke else 16
    hub = HubServer().start()
    hub.add("rbee-bench/gateway-GGUF", path.name, path=path)
    os.environ["HF_ENDPOINT"] = hub.url
    layouts = [False] + ([True] if shutil.which("taskset") and len(os.sched_getaffinity(0)) >= 2 else [])
    results = {}
    try:
        _hive("models", "register", MODEL, "--repo", "rbee-bench/gateway-GGUF", "--file", path.name)
        _hive("models", "download", MODEL)
        for pinned in layouts:
            results[pinned] = _measure(home, smoke, pinned, clients)
    finally:
        hub.stop()
        kill_workers(home)
    for pinned, m in results.items():
        yield from _rows(m, " (gateway core 0, worker core 1)" if pinned else "", clients)
