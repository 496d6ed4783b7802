"""Worker processes of one pool: spawn (detached, own process group), wait until ready, stop, follow the log.

Each worker runs under a small supervisor (hive/supervise.py) that leads its process group and records how
the worker ended; the registry of what runs is hive/records.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import psutil

from rbee_tui import files
from rbee_tui.capacity import MemoryPrediction, check_fits, default_ctx, free_for_workers, predict_worker, room_note
from rbee_tui.catalog import CatalogStore, ModelEntry, ShapeCache
from rbee_tui.cluster.planner import DEFAULT_MARGIN
from rbee_tui.errors import RbeeError
from rbee_tui.hive import warm
from rbee_tui.hive.records import (
    Registry,
    WorkerRecord,
    _alive,
    _exit_info,
    failure_reason,
    group_members,
    memory_in_use,
)
from rbee_tui.names import BACKENDS, check_id
from rbee_tui.worker.client import ENGINE_EMBEDDED, ENGINE_SERVER, ENGINES, probe_health
from rbee_tui.worker.upstream import find_llama_server

BASE_PORT = 8000
STOP_GRACE_S = 10.0


def reserve_port(host: str, wanted: int | None, gpu: int, taken: set[int]) -> tuple[int, socket.socket]:
    """Bind the requested port (it must be free), else 8000+gpu or the next free one; return it bound.

    The bound socket is handed to the worker, so no other spawn (another pool on this machine, say) can take
    the port between our choice and the worker's start.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports = [wanted] if wanted is not None else range(BASE_PORT + gpu, BASE_PORT + gpu + 200)
    for port in ports:
        if port in taken:
            continue
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
            # Listening at once makes the port ours: a second bind, even with SO_REUSEADDR, now fails.
            sock.listen(128)
        except OSError:
            sock.close()
            continue
        return port, sock
    if wanted is not None:
        raise RbeeError(f"port {wanted} is already in use", "leave out --port to pick a free one")
    raise RbeeError(f"no free port from {BASE_PORT + gpu} upwards")


def _worker_id(backend: str, gpu: int, taken: set[str]) -> str:
    base = f"worker-{backend}-{gpu}"
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


def check_spawnable(entry: ModelEntry, backend: str, gpu: int, pool_backends: list[str], gpu_count: int) -> None:
    """Refuse, with the seeds' messages, what cannot run."""
    if backend not in BACKENDS:
        raise RbeeError(f"unknown backend {backend!r}", f"choose from {', '.join(BACKENDS)}")
    if not entry.downloaded:
        raise RbeeError(f"Model {entry.id} not downloaded. Run: rbee-hive models download {entry.id}")
    if backend not in entry.backends:
        raise RbeeError(
            f"Model {entry.id} doesn't support {backend} backend", f"it supports: {', '.join(entry.backends)}"
        )
    if backend not in pool_backends:
        raise RbeeError(f"Backend {backend} is not available on this pool", f"available: {', '.join(pool_backends)}")
    if backend == "cuda" and not 0 <= gpu < gpu_count:
        raise RbeeError(f"GPU {gpu} does not exist on this pool", f"it has {gpu_count} GPU(s)")
    if not Path(entry.path).is_file():
        raise RbeeError(f"the model file {entry.path} is missing", f"run: rbee-hive models verify {entry.id}")


def _command(
    record_id: str,
    entry: ModelEntry,
    backend: str,
    gpu: int,
    host: str,
    port: int,
    engine: str,
    n_ctx: int | None,
    llama_server: str | None,
) -> list[str]:
    if engine == ENGINE_SERVER:
        # rbee-worker in front of llama-server: the same API, and llama-server lives and dies with it. Its own
        # module rather than the launcher, so a warm agent never forks it (llama-server is its own binary).
        argv = [sys.executable, "-m", "rbee_tui.worker.proxy", "--llama-server", find_llama_server(llama_server)]
        n_ctx = n_ctx or default_ctx(entry.metadata.get("context_length"))
    else:
        argv = [sys.executable, "-m", "rbee_tui.worker.launch"]
    argv += [
        "--model",
        entry.path,
        "--model-id",
        entry.id,
        "--worker-id",
        record_id,
        "--backend",
        backend,
        "--gpu",
        str(gpu),
        "--host",
        host,
        "--port",
        str(port),
    ]
    if n_ctx:
        argv += ["--n-ctx", str(n_ctx)]
    return argv


def _parallel(server_args: tuple[str, ...]) -> int:
    """The slots llama-server will run: the last --parallel/-np among the extra arguments, else the worker's 1."""
    slots = 1
    for flag, value in itertools.pairwise(server_args):
        if flag in ("--parallel", "-np") and value.isdigit():
            slots = max(int(value), 1)
    return slots


def predict_spawn(
    store: CatalogStore,
    entry: ModelEntry,
    backend: str,
    engine: str,
    n_ctx: int | None,
    server_args: tuple[str, ...] = (),
) -> MemoryPrediction | None:
    """What a worker of `entry` spawned with these arguments will hold (its context as the worker will pick it);
    None when the file's header cannot be read: the worker then starts and says why llama.cpp cannot load it."""
    shape = ShapeCache(store.models_dir).shapes([Path(entry.path)])[str(Path(entry.path))]
    if shape is None:
        return None
    if not n_ctx:
        # As the worker picks it: llama-server's from the catalog (see _command), the embedded engine's from the file.
        trained = entry.metadata.get("context_length") if engine == ENGINE_SERVER else shape.n_ctx_train
        n_ctx = default_ctx(trained)
    return predict_worker(shape, n_ctx, backend, _parallel(server_args), engine)


def check_room(
    prediction: MemoryPrediction,
    registry: Registry,
    live: list[WorkerRecord],
    backend: str,
    gpu: int,
    memory_budget: int | None,
    reserve: int | None,
    what: str = "",
) -> None:
    """Refuse (WontFit, with both numbers) a worker whose prediction exceeds the room the node has for it."""
    if backend == "cpu":
        vm = psutil.virtual_memory()
        used, coming = memory_in_use(live)
        free = free_for_workers(int(vm.available) - coming, int(vm.total), memory_budget, reserve, used)
        room = room_note(memory_budget, reserve)
    else:
        from rbee_tui.hive.status import nvidia_gpus

        gpus, _ = nvidia_gpus()
        card = next((g for g in gpus if g["index"] == gpu), None)
        if card is None:
            return  # check_spawnable has said so already
        # The budget and reserve are of RAM; a GPU keeps the planner's margin of its free memory.
        free = int((card["memory_total"] - card["memory_used"]) * (1.0 - DEFAULT_MARGIN))
        room = f"GPU {gpu}, {DEFAULT_MARGIN:.0%} of its free memory kept free"
    check_fits(prediction, free, registry.pool_id, f"{prediction.describe()}; room: {room}", what)


def spawn(
    store: CatalogStore,
    registry: Registry,
    backend: str,
    model_id: str,
    *,
    gpu: int = 0,
    port: int | None = None,
    host: str = "127.0.0.1",
    engine: str = ENGINE_EMBEDDED,
    n_ctx: int | None = None,
    llama_server: str | None = None,
    kind: str = "worker",
    server_args: tuple[str, ...] = (),
    memory_budget: int | None = None,
    reserve: int | None = None,
) -> WorkerRecord:
    """Start a worker detached in its own process group and record it.

    `server_args` go to llama-server after the worker's own (later flags win there): a cluster coordinator's
    --rpc, --tensor-split, -ngl, -c and --fit off. A worker whose predicted memory exceeds the room the pool has
    for it (its `memory_budget` or `reserve`, else available memory less a margin) is refused with WontFit
    before anything starts; a cluster coordinator was placed by the cluster planner and is not checked again.
    """
    from rbee_tui.hive.status import available_backends, nvidia_gpus

    if engine not in ENGINES:
        raise RbeeError(f"unknown engine {engine!r}", f"choose from {', '.join(ENGINES)}")
    entry = store.load().get(check_id(model_id))
    gpus, _ = nvidia_gpus() if backend == "cuda" else ([], None)
    pool_backends = available_backends(gpus, engine) if backend != "cpu" else ["cpu"]
    check_spawnable(entry, backend, gpu, pool_backends, len(gpus))
    prediction = predict_spawn(store, entry, backend, engine, n_ctx, server_args) if kind == "worker" else None
    registry.dir.mkdir(parents=True, exist_ok=True)
    registry.logs.mkdir(parents=True, exist_ok=True)
    with files.locked(registry.path):
        records = registry.read()
        live = [r for r in records if _alive(r) is not None]
        if prediction is not None:
            # Under the registry's lock: two spawns at once cannot both take the same room.
            check_room(prediction, registry, live, backend, gpu, memory_budget, reserve, entry.id)
        chosen_port, sock = reserve_port(host, port, gpu, {r.port for r in live})
        wid = _worker_id(backend, gpu, {r.id for r in records})
        log_path = registry.logs / f"{wid}.log"
        exit_file = registry.dir / f"{wid}.exit"
        exit_file.unlink(missing_ok=True)
        argv = _command(wid, entry, backend, gpu, host, chosen_port, engine, n_ctx, llama_server)
        argv += ["--fd", str(sock.fileno())]
        env = os.environ.copy()
        env["PYTHONUNBUFFERED"] = "1"
        if server_args:
            import shlex

            env["RBEE_LLAMA_SERVER_ARGS"] = shlex.join(server_args)  # read by worker/upstream.py
        if backend == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker must not grab GPU memory
        forked = warm.can_fork(argv, backend)
        with new_log(log_path, "spawn (forked warm)" if forked else "spawn", argv) as log_fh:
            if forked:
                pid = warm.fork_worker(argv, str(exit_file), log_fh.fileno(), env)
            else:
                pid = start_supervised(argv, exit_file, log_fh, env, pass_fds=(sock.fileno(),))
        sock.close()  # the worker holds it now
        record = WorkerRecord(
            id=wid,
            pid=pid,
            create_time=psutil.Process(pid).create_time(),
            port=chosen_port,
            host=host,
            model=entry.id,
            model_path=entry.path,
            backend=backend,
            gpu=gpu,
            engine=engine,
            started_at=time.time(),
            log=str(log_path),
            exit_file=str(exit_file),
            argv=tuple(argv),
            kind=kind,
            predicted_bytes=prediction.total if prediction is not None else 0,
        )
        registry.write([*records, record])
    return record


@contextlib.contextmanager
def new_log(path: Path, how: str, argv: list[str]) -> Iterator[BinaryIO]:
    """A process's log, started afresh (a new process reusing an id gets a log of its own) with a header line."""
    with open(path, "wb") as fh:
        fh.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {how}: {' '.join(argv)}\n".encode())
        fh.flush()
        yield fh


def start_supervised(
    argv: list[str], exit_file: Path, log_fh: BinaryIO, env: dict[str, str], pass_fds: tuple[int, ...] = ()
) -> int:
    """Start `argv` under the supervisor (hive/supervise.py: it leads its own process group and records the
    exit), its output in `log_fh`; the supervisor's pid."""
    full = [sys.executable, "-m", "rbee_tui.hive.supervise", str(exit_file), "--", *argv]
    return subprocess.Popen(
        full,
        stdin=subprocess.DEVNULL,
        stdout=log_fh,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        pass_fds=pass_fds,
        env=env,
    ).pid


def wait_ready(record: WorkerRecord, timeout: float = 300.0, interval: float = 0.02) -> dict[str, Any]:
    """Block until the worker answers ready, or raise with the reason it died or timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _alive(record) is None or Path(record.exit_file).exists():
            raise RbeeError(f"worker {record.id} died while starting: {failure_reason(record)}")
        state, body = probe_health(record.url, record.engine, timeout=1.0)
        if state in ("ready", "busy"):
            return body
        time.sleep(interval)
    raise RbeeError(f"worker {record.id} was not ready after {timeout:.0f}s", f"see rbee-hive worker logs {record.id}")


# -- stop and logs ------------------------------------------------------------------------------------------


def stop(registry: Registry, worker_id: str, grace: float = STOP_GRACE_S) -> dict[str, Any]:
    """SIGTERM the worker, SIGKILL its whole process group after `grace` seconds, and forget it."""
    record = registry.find(worker_id)
    forced = False
    if _alive(record) is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)  # the supervisor forwards it to the worker
        deadline = time.monotonic() + grace
        while group_members(record.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    if group_members(record.pid):
        forced = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while group_members(record.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    left = [p.pid for p in group_members(record.pid)]
    if left:
        raise RbeeError(f"worker {worker_id}: processes {left} survived SIGKILL")
    info = _exit_info(record)
    with files.locked(registry.path):
        registry.write([r for r in registry.read() if r.id != worker_id])
    Path(record.exit_file).unlink(missing_ok=True)
    return {
        "worker_id": worker_id,
        "stopped": True,
        "forced": forced,
        "exit_code": info.get("exit_code"),
        "signal": info.get("signal"),
        "log": record.log,
    }


def follow(record: WorkerRecord, poll: float = 0.1) -> Iterator[str]:
    """Yield the log's lines, then new ones as they come, until the worker has ended and the file is drained."""
    with open(record.log, "rb") as fh:
        buf = b""
        while True:
            chunk = fh.read(64 * 1024)
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
                continue
            if _alive(record) is None:
                if buf:
                    yield buf.decode("utf-8", "replace")
                return
            time.sleep(poll)
