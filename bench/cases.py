"""The benchmarks. Each returns result rows: name, figure, unit, baseline (same run), ratio, target, met."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shlex
import shutil
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
SETTLE_S = 0.3  # pause between two measured sides (see worker_overhead)
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


def _in_process(llm: Any, n: int) -> tuple[float, float]:
    """The same greedy generation with plain `llama_cpp.Llama`: decode t/s and time to first token (ms)."""
    times: list[float] = []
    t0 = time.perf_counter()
    tokens = llm.tokenize(b"Hello, how are you?", add_bos=True, special=True)
    llm.reset()
    for tok in llm.generate(tokens, temp=0.0, top_k=40, top_p=0.95, repeat_penalty=1.0, reset=False):
        llm.detokenize([tok])
        times.append(time.perf_counter())
        if len(times) >= n:
            break
    return (len(times) - 1) / (times[-1] - times[0]), (times[0] - t0) * 1000.0


def _llama_bench(binary: str, path: Path, n: int) -> float:
    """llama.cpp's own `tg` figure, one repetition."""
    threads = len(os.sched_getaffinity(0))
    argv = [binary, "-m", str(path), "-p", "0", "-n", str(n), "-r", "1", "-t", str(threads), "-o", "json"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def timed_stream(port: int, path: str, body: dict[str, Any], marker: bytes) -> tuple[float, list[float], bytes]:
    """POST `body` to 127.0.0.1:`port``path` and read the streamed answer with a bare socket: (send time, the
    arrival time of each event that starts with `marker`, the whole stream). An event split between two reads
    counts once, when it is whole. A bare reader: on 2 cores a Python SSE parser would take its CPU from the
    worker's decode threads and be counted as the worker's overhead."""
    import socket

    raw = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n"
    ).encode()
    times: list[float] = []
    stream = bytearray()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        t0 = time.perf_counter()
        sock.sendall(head + raw)
        while data := sock.recv(1 << 16):
            now = time.perf_counter()
            stream += data
            times += [now] * (stream.count(marker) - len(times))
    return t0, times, bytes(stream)


def _through_worker(port: int, n: int) -> tuple[float, float]:
    """The same generation streamed from `/execute` over HTTP: decode t/s and time to first token (ms), as seen
    by a client."""
    body = {"prompt": "Hello, how are you?", "max_tokens": n, "temperature": 0.0, "seed": 42}
    t0, times, stream = timed_stream(port, "/execute", body, b"event: token\n")
    if len(times) < 2:
        raise RuntimeError(f"the worker streamed {len(times)} token(s)")
    if times[-1] == times[0]:  # a tiny model's tokens all came in one read: take the worker's own figure
        done = json.loads(stream.split(b"event: done\ndata: ", 1)[1].split(b"\n", 1)[0])
        return float(done["tokens_per_sec"]), (times[0] - t0) * 1000.0
    return (len(times) - 1) / (times[-1] - times[0]), (times[0] - t0) * 1000.0


def worker_overhead(smoke: bool) -> Iterator[dict[str, Any]]:
    from tests.e2e.test_worker_api import free_port, http

    path = model("bench-85m", smoke)
    n, reps = (16, 1) if smoke else (64, 11)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rbee_tui.worker.launch", "--model", str(path), "--port", str(port), "--n-ctx", "512"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    import llama_cpp

    # llama.cpp's own figure too, when `scripts/build-llama-cpp.sh` has built llama-bench.
    found = sorted(glob.glob(str(Path.home() / ".cache/rbee/llama.cpp/*/bin/llama-bench")))
    bench_bin = found[-1] if found and not smoke else None
    threads = len(os.sched_getaffinity(0))  # what the worker uses
    llm = llama_cpp.Llama(  # the worker's settings: every CPU, flash attention (see LlamaCppEngine.load)
        str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False
    )
    try:
        while http("GET", f"{url}/health")[0] != 200:
            time.sleep(0.05)
        local, remote, bench = [], [], []
        for _ in range(reps):  # interleaved, so all three see the same machine
            # Each side starts on quiet cores: llama.cpp's OpenMP threads spin for some milliseconds after a
            # generation, and back to back that spin would be charged to whichever side runs next.
            time.sleep(SETTLE_S)
            local.append(_in_process(llm, n))
            time.sleep(SETTLE_S)
            remote.append(_through_worker(port, n))
            if bench_bin:
                time.sleep(SETTLE_S)
                bench.append(_llama_bench(bench_bin, path, n))
    finally:
        llm.close()
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
    if bench:
        tg = statistics.median(bench)
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
    from rbee_tui.hive.records import Registry
    from rbee_tui.hive.workers import spawn, stop, wait_ready

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


def ssh_pool(name: str, sshd: Any, key: Path, home: Path, hive_command: str) -> Any:
    """A pool config for the node behind `sshd` (the benchmarks' own sshd on loopback)."""
    import getpass

    from rbee_tui.config import PoolConfig

    return PoolConfig(
        name=name,
        transport="ssh",
        host="127.0.0.1",
        port=sshd.port,
        user=getpass.getuser(),
        identity_file=str(key),
        known_hosts=str(sshd.known_hosts),
        models_dir=str(home / "node" / "models"),
        hive_command=hive_command,
    )


def ssh_argv(sshd: Any, key: Path) -> list[str]:
    """`ssh` to that node as a user's script would: a new connection each time."""
    import getpass

    known = f"UserKnownHostsFile={sshd.known_hosts}"
    user = f"{getpass.getuser()}@127.0.0.1"
    return ["ssh", "-i", str(key), "-p", str(sshd.port), "-o", known, "-o", "BatchMode=yes", user]


# -- 3. matrix wall time ------------------------------------------------------------------------------------

MATRIX_SPECS = {  # three architectures and sizes; each cell's pure work is about a second on one core
    "mx-llama-60m": dict(n_embd=640, n_layer=10, n_head=10, n_head_kv=10, n_ff=1792, seed=31),
    "mx-qwen2-45m": dict(arch="qwen2", n_embd=512, n_layer=10, n_head=8, n_head_kv=8, n_ff=1536, seed=32),
    "mx-llama-30m": dict(n_embd=384, n_layer=8, n_head=6, n_head_kv=6, n_ff=1024, seed=33),
}


def _matrix_models(smoke: bool) -> dict[str, Path]:
    from rbee_tui.tinymodel import TinySpec, write_model

    if smoke:
        return {"tiny": model("tiny", True)}
    out = {}
    for name, spec in MATRIX_SPECS.items():
        path = CACHE / f"{name}.gguf"
        if not path.exists():
            write_model(path, TinySpec(name=name, n_ctx=1024, f16=True, **spec))
        out[name] = path
    return out


def _seeds_flow(pools: dict[str, Any], models: list[str], max_tokens: int, ssh: list[str]) -> float:
    """The seeds' serial flow, as their script did it: per cell spawn, sleep 10, curl, stop (over ssh when remote)."""
    t0 = time.perf_counter()
    for name, pool in pools.items():
        prefix = [*ssh, shlex.join(pool.hive_command.split())] if pool.transport == "ssh" else pool.hive_command.split()
        common = ["--pool-id", name, "--models-dir", pool.models_dir]

        def run(*args: str, prefix: list[str] = prefix, remote: bool = pool.transport == "ssh") -> str:
            argv = [*prefix[:-1], f"{prefix[-1]} {shlex.join(args)}"] if remote else [*prefix, *args]
            return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout

        for m in models:
            w = json.loads(run(*common, "worker", "spawn", "cpu", "--model", m, "--json").splitlines()[-1])
            time.sleep(10)
            body = json.dumps({"prompt": "Hello, how are you?", "max_tokens": max_tokens, "seed": 42})
            curl = ["curl", "-s", "-N", "-X", "POST", f"http://127.0.0.1:{w['port']}/execute", "-d", body]
            if pool.transport == "ssh":
                subprocess.run([*ssh, shlex.join(curl)], capture_output=True, check=True, timeout=120)
            else:
                subprocess.run(curl, capture_output=True, check=True, timeout=120)
            run(*common, "worker", "stop", w["id"], "--json")
    return time.perf_counter() - t0


def matrix(smoke: bool) -> Iterator[dict[str, Any]]:
    import shutil

    from rbee_tui.config import PoolConfig
    from rbee_tui.matrix.plan import Cell
    from rbee_tui.matrix.scheduler import MatrixRunner
    from rbee_tui.matrix.store import Store
    from rbee_tui.pools.client import PoolClient
    from tests.support.cleanup import kill_workers
    from tests.support.hub import HubServer
    from tests.support.sshd import Sshd, environment_for, keygen, sshd_available

    if sshd_available():
        return
    home = isolated()
    models = _matrix_models(smoke)
    max_tokens = 8 if smoke else 64
    hub = HubServer().start()
    for name, path in models.items():
        hub.add("rbee-bench/matrix-GGUF", f"{name}.gguf", path=path)
    os.environ["HF_ENDPOINT"] = hub.url
    key = keygen(home / "key")
    sshd = Sshd(home / "sshd", key, env=environment_for(home / "node", hub.url)).start()
    hive = str(Path(sys.executable).with_name("rbee-hive"))
    # Two machines of one core each, on this machine's two cores: each pool (and so each of its workers, which
    # use the CPUs they may run on) is pinned to its own core, and so is its in-process critical path.
    pin = shutil.which("taskset") and len(os.sched_getaffinity(0)) >= 2
    cores = {"local": "0", "remote": "1"}

    def hive_for(pool: str) -> str:
        return f"taskset -c {cores[pool]} {hive}" if pin else hive

    pools = {
        "local": PoolConfig(name="local", models_dir=str(home / "local-models"), hive_command=hive_for("local")),
        "remote": ssh_pool("remote", sshd, key, home, hive_for("remote")),
    }
    ssh = ssh_argv(sshd, key)

    async def prepare_and_run() -> tuple[float, list[dict[str, Any]]]:
        clients = {name: PoolClient(p) for name, p in pools.items()}
        for c in clients.values():
            c.start()
        try:
            for c in clients.values():
                await c.wait_connected(30)
                for name in models:
                    repo_file = f"{name}.gguf"
                    await c.hive("models", "register", name, "--repo", "rbee-bench/matrix-GGUF", "--file", repo_file)
                    async for _ in c.hive_stream("models", "download", name):
                        pass
            cells = [Cell(m, p, "cpu", 0) for p in pools for m in models]
            store = Store(home / "matrix.db")
            runner = MatrixRunner(clients, store, max_tokens=max_tokens)
            t0 = time.perf_counter()
            run_id = await runner.run(cells)
            wall = time.perf_counter() - t0
            return wall, store.jobs(run_id)
        finally:
            for c in clients.values():
                await c.close()

    try:
        wall, jobs = asyncio.run(prepare_and_run())
        failed = [j for j in jobs if j["state"] != "passed"]
        if failed:
            raise RuntimeError(f"matrix cells did not pass: {[(j['cell'], j['reason']) for j in failed]}")
        paths = [str(p) for p in models.values()]
        per_pool = []
        for pool in pools:
            argv = [sys.executable, "-m", "bench.pure", "--max-tokens", str(max_tokens), *paths]
            argv = ["taskset", "-c", cores[pool], *argv] if pin else argv
            done = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT, timeout=600)
            per_pool.append(sum(json.loads(done.stdout.splitlines()[-1])))
        critical = max(per_pool)
        seeds = None if smoke else _seeds_flow(pools, list(models), max_tokens, ssh)
    finally:
        sshd.stop()
        hub.stop()
        kill_workers(home)
    n = f"{len(models)}x{len(pools)}"
    yield row(
        f"matrix {n}: wall vs critical path", wall, "s", "<= 1.2x", critical, wall / critical, wall / critical <= 1.2
    )
    if seeds is not None:
        yield row(f"matrix {n}: vs seeds' serial flow", wall, "s", "report", seeds, seeds / wall)


# -- 4. remote command latency ------------------------------------------------------------------------------


def remote_latency(smoke: bool) -> Iterator[dict[str, Any]]:

    from rbee_tui.pools.client import PoolClient
    from tests.support.sshd import Sshd, environment_for, keygen, sshd_available

    if sshd_available():
        return
    home = isolated()
    key = keygen(home / "key")
    sshd = Sshd(home / "sshd", key, env=environment_for(home / "node")).start()
    hive = str(Path(sys.executable).with_name("rbee-hive"))
    pool = ssh_pool("bench", sshd, key, home, hive)
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
        cmd = [*ssh_argv(sshd, key), hive, "--pool-id", "bench", "--models-dir", pool.models_dir]
        cmd += ["models", "catalog", "--json"]
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
    # The whole agent process as it runs for the dashboard, beside glances (its stdout mode, the same readings,
    # the same interval) when it is installed: CPU seconds over a window after both have started.
    window = 3.0 if smoke else 30.0
    ours = _process_cpu_share([str(Path(sys.executable).with_name("rbee-hive")), "metrics", "--json"], window)
    glances = shutil.which("glances") or str(Path(sys.executable).with_name("glances"))
    peer = None
    if Path(glances).exists():
        fields = "cpu.total,percpu,mem,memswap,load,diskio,network,sensors"
        peer = _process_cpu_share([glances, "--stdout", fields, "-t", "1"], window)
    yield row(
        "metrics: agent process at 1 Hz",
        ours,
        "%",
        "<= 0.5% of a core",
        peer,
        None if peer is None else peer / max(ours, 1e-6),
        ours <= 0.5,
        peer_name="glances --stdout" if peer is not None else "glances not installed",
    )


def _process_cpu_share(argv: list[str], window: float, warmup: float = 3.0) -> float:
    """Percent of one core that a command uses once started, measured over `window` seconds."""
    import psutil

    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ps = psutil.Process(proc.pid)
        time.sleep(warmup)  # its start-up (imports, first readings) is not what it costs to keep running
        c0, t0 = sum(ps.cpu_times()[:2]), time.perf_counter()
        time.sleep(window)
        c1, t1 = sum(ps.cpu_times()[:2]), time.perf_counter()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return (c1 - c0) / (t1 - t0) * 100.0


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


# -- 6. dashboard under load --------------------------------------------------------------------------------


class Terminal:
    """A program on a pseudo-terminal of a fixed size; everything it draws is kept with the time it came."""

    def __init__(self, argv: list[str], cols: int = 160, rows: int = 50) -> None:
        import fcntl
        import struct
        import termios
        import threading

        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLORTERM": "truecolor"}
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True, cwd=ROOT
        )
        os.close(slave)
        self.fd = master
        self.chunks: list[tuple[float, bytes]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.chunks.append((time.perf_counter(), b""))
                    self.cond.notify_all()
                    return
                self.chunks.append((time.perf_counter(), data))
                self.cond.notify_all()

    def send(self, data: bytes) -> tuple[float, int]:
        """Type `data`; return when, and where in the output that was."""
        with self.cond:
            mark = len(self.chunks)
        t0 = time.perf_counter()
        os.write(self.fd, data)
        return t0, mark

    def wait_for(self, needle: bytes, since: int = 0, timeout: float = 10.0) -> float:
        """The time at which `needle` had been drawn, looking from chunk `since` on."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                seen = b""
                for t, data in self.chunks[since:]:
                    seen += data
                    if needle in seen:
                        return t
                if self.chunks and self.chunks[-1][1] == b"":
                    raise RuntimeError(f"the program ended before drawing {needle!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{needle!r} not drawn after {timeout}s")
                self.cond.wait(left)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.fd, b"q")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _drive_dashboard(pools: int, workers: int, presses: int, window: float) -> tuple[float, float, list[float]]:
    """Start the loaded dashboard on a terminal; return its first paint (s), idle CPU share (%) and key latencies."""
    import random

    import psutil

    term = Terminal([sys.executable, "-m", "bench.dashboard", "--pools", str(pools), "--workers", str(workers)])
    try:
        # First paint: the pool list drawn, from the moment the process was started.
        first = term.wait_for(b"pool-00", timeout=60) - term.started
        term.wait_for(b"pool-00: connected", timeout=30)  # the first sample of the selected pool is in
        proc = psutil.Process(term.proc.pid)
        # The app's CPU share while it shows a busy fleet (every pool's sample each second) and nobody types.
        c0, t0 = sum(proc.cpu_times()[:2]), time.perf_counter()
        time.sleep(window)
        cpu = (sum(proc.cpu_times()[:2]) - c0) / (time.perf_counter() - t0) * 100.0
        # Keypress to screen: move through the pool list; the status line names the newly selected pool.
        rng = random.Random(1)
        latencies, at, step = [], 0, 1
        for _ in range(presses):
            if not 0 <= at + step < pools:
                step = -step
            at += step
            sent, mark = term.send(b"\x1b[B" if step > 0 else b"\x1b[A")
            drawn = term.wait_for(f"pool-{at:02d}: connected".encode(), since=mark)
            latencies.append((drawn - sent) * 1000.0)
            time.sleep(rng.uniform(0.1, 0.4))  # off the beat of the samples, so presses land anywhere in it
    finally:
        term.close()
    return first, cpu, sorted(latencies)


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(0.95 * len(ordered)) - 1)]


def dashboard(smoke: bool) -> Iterator[dict[str, Any]]:
    isolated()
    pools, workers = (4, 2) if smoke else (32, 8)
    presses, window = (5, 3.0) if smoke else (60, 20.0)
    # The baseline, in the same run: the same app with two quiet pools (no GPUs' worth of workers).
    base_first, base_cpu, base_lat = _drive_dashboard(2, 0, presses, window)
    first, cpu, latencies = _drive_dashboard(pools, workers, presses, window)
    p95, base_p95 = _p95(latencies), _p95(base_lat)
    name = f"dashboard {pools}x{workers}"
    yield row(
        f"{name}: keypress p95",
        p95,
        "ms",
        "p95 <= 50 ms",
        base_p95,
        p95 / base_p95,
        p95 <= 50.0,
        median_ms=statistics.median(latencies),
        baseline_median_ms=statistics.median(base_lat),
        presses=presses,
    )
    yield row(f"{name}: CPU share", cpu, "%", "<= 20 % of a core", base_cpu, cpu / max(base_cpu, 1e-6), cpu <= 20.0)
    yield row(
        "dashboard: start to first paint", first * 1000.0, "ms", "<= 1500 ms", base_first * 1000.0, None, first <= 1.5
    )


def cluster(smoke: bool) -> Iterator[dict[str, Any]]:
    """One model over 1, 2 and 3 nodes, SSH relay vs direct, cold vs warm tensor cache (bench/cluster.py)."""
    from bench.cluster import cluster as run

    yield from run(smoke)


def capacity(smoke: bool) -> Iterator[dict[str, Any]]:
    """The concurrency sweep per engine: aggregate tokens/s at 4 streams against 1 (bench/capacity.py)."""
    from bench.capacity import capacity as run

    yield from run(smoke)


def gateway(smoke: bool) -> Iterator[dict[str, Any]]:
    """What `rbee-tui gateway` adds to a stream against the worker called directly, and its rate (bench/gateway.py)."""
    from bench.gateway import gateway as run

    yield from run(smoke)


ALL: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {
    "worker": worker_overhead,
    "readiness": readiness,
    "matrix": matrix,
    "remote": remote_latency,
    "metrics": metrics,
    "dashboard": dashboard,
    "downloads": downloads,
    "cluster": cluster,
    "gateway": gateway,
    "capacity": capacity,
}
