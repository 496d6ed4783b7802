"""llama.cpp's `ggml-rpc-server` on this node: start, status, stop, as a supervised process of kind `rpc`.

It runs under the workers' supervisor (hive/supervise.py: it leads the process group and records the exit) and
is stopped the workers' way (SIGTERM, then SIGKILL to the group), from a registry of its own,
$XDG_STATE_HOME/rbee/pools/<pool>/rpc/workers.json, so `worker list` never shows it. One per node: a
ggml-rpc-server serves one coordinator at a time (docs/cluster.md), and `busy` says whether one is connected.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from rbee_tui import files
from rbee_tui.config import state_dir
from rbee_tui.errors import RbeeError
from rbee_tui.hive import records as worker_records
from rbee_tui.hive import workers
from rbee_tui.hive.records import Registry, WorkerRecord, group_members, tail, worker_process
from rbee_tui.llama_build import build_cache, cached
from rbee_tui.names import check_id

RPC_ID = "rpc"
DEFAULT_PORT = 50052  # ggml-rpc-server's own default (tools/rpc/rpc-server.cpp:87)
KIND = "rpc"
NAMES = ("ggml-rpc-server", "rpc-server")  # newer llama.cpp, older
_DEVICE = re.compile(r"^\s+(\S+): (.*) \((\d+) MiB, (\d+) MiB free\)\s*$")
MiB = 1 << 20


class RpcRegistry(Registry):
    """The node's RPC server registry: the workers' format, in a directory of its own."""

    def __init__(self, pool_id: str) -> None:
        self.dir = state_dir() / "pools" / check_id(pool_id, "pool id") / "rpc"
        self.path = self.dir / "workers.json"
        self.logs = self.dir / "logs"


# -- binaries and builds ------------------------------------------------------------------------------------


def _executable(candidate: str, what: str) -> str:
    path = Path(candidate).expanduser()
    if path.is_file() and os.access(path, os.X_OK):
        return str(path)
    raise RbeeError(f"{what} not found at {path}")


def find_rpc_server(explicit: str | None = None, llama_server: str | None = None) -> str:
    """ggml-rpc-server: --rpc-server / the pool's rpc_server key, $RBEE_RPC_SERVER, beside llama-server, the
    build cache, PATH."""
    for candidate in (explicit, os.environ.get("RBEE_RPC_SERVER")):
        if candidate:
            return _executable(candidate, "ggml-rpc-server")
    if llama_server:
        for name in NAMES:
            beside = Path(llama_server).expanduser().parent / name
            if beside.is_file() and os.access(beside, os.X_OK):
                return str(beside)
    found = cached(NAMES) or next((p for p in map(shutil.which, NAMES) if p), None)
    if found:
        return found
    raise RbeeError(
        "ggml-rpc-server is not installed on this node",
        "build it with scripts/build-llama-cpp.sh, or set rpc_server in the pool's config",
    )


def build_of(binary: str) -> str:
    """The llama.cpp build a binary belongs to: the build cache's version (`0.3.36-d0fc6ee6`) for its tools, else
    the BUILD_COMMIT file beside it, else what `llama-server --version` beside it says, else 'unknown'.

    RPC checks only the protocol's version, so nodes must run the same build; this is what is compared.
    """
    bin_dir = Path(binary).expanduser().parent
    commit = bin_dir / "BUILD_COMMIT"
    if commit.is_file():
        if bin_dir.name == "bin" and bin_dir.parent.parent == build_cache():
            return bin_dir.parent.name
        return commit.read_text().strip() or "unknown"
    server = bin_dir / "llama-server"
    if server.is_file():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=20)
            for line in (out.stdout + out.stderr).splitlines():
                if line.startswith("version:"):
                    return line.split(":", 1)[1].strip()
    return "unknown"


def cache_dir() -> Path:
    """The tensor cache of this node's RPC server (`-c`): $XDG_CACHE_HOME/rbee/rpc, else ~/.cache/rbee/rpc."""
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "rbee" / "rpc"


# -- process state ------------------------------------------------------------------------------------------


def server_process(record: WorkerRecord) -> psutil.Process | None:
    """The ggml-rpc-server process (the supervisor's child)."""
    return worker_process(record)


def _connections(proc: psutil.Process | None, port: int) -> tuple[bool, int]:
    """(listening on `port`, coordinators connected to it)."""
    if proc is None:
        return False, 0
    try:
        conns = proc.net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False, 0
    listening = any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)
    clients = sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)
    return listening, clients


def devices(log: str) -> list[dict[str, Any]]:
    """The devices the server listed at start, with total and free memory as it reported them."""
    out = []
    for line in tail(log, 200):
        m = _DEVICE.match(line)
        if m:
            name, desc, total, free = m.groups()
            out.append(
                {"name": name, "description": desc, "total_bytes": int(total) * MiB, "free_bytes": int(free) * MiB}
            )
    return out


def _binary_of(record: WorkerRecord) -> str:
    return next((a for a in record.argv if Path(a).name in NAMES), record.argv[0] if record.argv else "")


def describe(record: WorkerRecord) -> dict[str, Any]:
    """The server's record with its live state: running or exited, listening, busy, devices, build."""
    out = worker_records.describe(record, probe=False)
    binary = _binary_of(record)
    out.update(kind=KIND, binary=binary, build=build_of(binary), endpoint=f"{record.host}:{record.port}")
    out["devices"] = devices(record.log)
    out["cache_dir"] = record.model_path or None
    if out["state"] == "exited":
        out.update(listening=False, busy=False, clients=0)
        return out
    listening, clients = _connections(server_process(record), record.port)
    out.update(listening=listening, busy=clients > 0, clients=clients, state="running" if listening else "starting")
    return out


def current(registry: RpcRegistry) -> WorkerRecord | None:
    """The node's RPC server record, if one is registered."""
    return next((r for r in registry.read() if r.id == RPC_ID), None)


def status(
    registry: RpcRegistry, pool_id: str, binary: str | None = None, llama_server: str | None = None
) -> dict[str, Any]:
    """`rpc status`: whether a server runs here and its state, and the build of the one `rpc start` would run."""
    record = current(registry)
    out: dict[str, Any] = {"pool_id": pool_id, "running": False, "server": None}
    try:
        found = find_rpc_server(binary, llama_server)
        out.update(binary=found, build=build_of(found), missing=None)
    except RbeeError as exc:
        out.update(binary=None, build=None, missing=str(exc))
    if record is not None:
        server = describe(record)
        out.update(running=server["state"] != "exited", server=server)
    return out


# -- start and stop -----------------------------------------------------------------------------------------


def _pick_port(host: str, wanted: int | None, skip: set[int]) -> int:
    ports = [wanted] if wanted is not None else range(DEFAULT_PORT, DEFAULT_PORT + 200)
    for port in ports:
        if port in skip:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    if wanted is not None:
        raise RbeeError(f"port {wanted} is already in use on {host}", "leave out --port to pick a free one")
    raise RbeeError(f"no free port from {DEFAULT_PORT} upwards on {host}")


def start(registry: RpcRegistry, *, port: int | None = None, **options: Any) -> dict[str, Any]:
    """Start ggml-rpc-server under the supervisor, wait until it listens, and return its description.

    The port is free when picked, but ggml-rpc-server binds it itself a moment later: when another server took
    it in between (several nodes on one machine), the next free one is tried.
    """
    tried: set[int] = set()
    while True:
        try:
            return _start(registry, port=port, skip=tried, **options)
        except _PortTaken as exc:
            tried.add(exc.port)
            if port is not None or len(tried) >= 5:
                raise RbeeError(f"ggml-rpc-server could not listen on port {exc.port}: {exc.reason}") from None


class _PortTaken(Exception):
    def __init__(self, port: int, reason: str) -> None:
        super().__init__(reason)
        self.port = port
        self.reason = reason


def _start(
    registry: RpcRegistry,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    device: str | None = None,
    threads: int | None = None,
    binary: str | None = None,
    llama_server: str | None = None,
    cache: bool = True,
    timeout: float = 30.0,
    skip: set[int],
) -> dict[str, Any]:
    rpc_server = find_rpc_server(binary, llama_server)
    if threads is not None and threads < 1:
        raise RbeeError(f"--threads must be at least 1, not {threads}")
    registry.dir.mkdir(parents=True, exist_ok=True)
    registry.logs.mkdir(parents=True, exist_ok=True)
    with files.locked(registry.path):
        records = registry.read()
        old = next((r for r in records if r.id == RPC_ID), None)
        if old is not None and group_members(old.pid):
            raise RbeeError(
                f"an rpc-server already runs on this node (port {old.port})", "stop it first: rbee-hive rpc stop"
            )
        records = [r for r in records if r.id != RPC_ID]
        chosen = _pick_port(host, port, skip)
        log_path = registry.logs / f"{RPC_ID}.log"
        exit_file = registry.dir / f"{RPC_ID}.exit"
        exit_file.unlink(missing_ok=True)
        argv = [rpc_server, "-H", host, "-p", str(chosen)]
        if threads:
            argv += ["-t", str(threads)]
        if device:
            argv += ["-d", device]
        env = os.environ.copy()
        tensor_cache = ""
        if cache:
            argv.append("-c")
            tensor_cache = str(cache_dir())
            Path(tensor_cache).mkdir(parents=True, exist_ok=True)
            env["LLAMA_CACHE"] = tensor_cache  # where -c keeps large tensors (tools/rpc/rpc-server.cpp:64-83)
        if device and device.upper() == "CPU":
            env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU-only server must not grab GPU memory
        # ggml-rpc-server prints its devices with printf and flushes only on a client: line-buffer its stdout.
        stdbuf = shutil.which("stdbuf")
        command = [stdbuf, "-oL", *argv] if stdbuf else argv
        with workers.new_log(log_path, "rpc start", argv) as log_fh:
            pid = workers.start_supervised(command, exit_file, log_fh, env)
        record = WorkerRecord(
            id=RPC_ID,
            pid=pid,
            create_time=psutil.Process(pid).create_time(),
            port=chosen,
            host=host,
            model="",
            model_path=tensor_cache,
            backend=(device or "default").lower(),
            gpu=0,
            engine="ggml-rpc-server",
            started_at=time.time(),
            log=str(log_path),
            exit_file=str(exit_file),
            argv=tuple(argv),
            kind=KIND,
        )
        registry.write([*records, record])
    return wait_listening(registry, record, timeout)


def wait_listening(registry: RpcRegistry, record: WorkerRecord, timeout: float) -> dict[str, Any]:
    """Wait until the server listens; if it ends first (an unknown flag exits 0), stop it and say why."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = describe(record)
        if out["state"] == "exited":
            with contextlib.suppress(RbeeError):
                workers.stop(registry, RPC_ID, grace=1)
            if "create server socket" in str(out.get("reason")):
                raise _PortTaken(record.port, str(out.get("reason")))
            raise RbeeError(f"ggml-rpc-server ended before it listened: {out.get('reason')}")
        if out["listening"]:
            return out
        time.sleep(0.05)
    with contextlib.suppress(RbeeError):
        workers.stop(registry, RPC_ID, grace=1)
    raise RbeeError(f"ggml-rpc-server did not listen on {record.host}:{record.port} within {timeout:.0f}s")


def stop(registry: RpcRegistry, grace: float = 5.0) -> dict[str, Any]:
    """Stop the node's RPC server (SIGTERM, SIGKILL to its group after `grace` s); nothing running is no error."""
    if current(registry) is None:
        return {"worker_id": RPC_ID, "stopped": False, "running": False}
    out = workers.stop(registry, RPC_ID, grace=grace)
    out["running"] = False
    return out
