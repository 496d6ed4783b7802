"""The worker registry of one pool: records (atomic JSON, locked) in $XDG_STATE_HOME/rbee/pools/<pool>/, and
what each recorded process is doing now (alive, its process, memory, why it ended, its health).

Node side: workers.py starts and stops the processes; metrics.py and the CLI read them through here.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from rbee_tui import files
from rbee_tui.config import state_dir
from rbee_tui.errors import RbeeError
from rbee_tui.names import check_id
from rbee_tui.worker.client import ENGINE_SERVER, probe_health


@dataclass(frozen=True)
class WorkerRecord:
    """What the registry keeps about a spawned worker."""

    id: str
    pid: int  # the supervisor: leader of the worker's process group
    create_time: float
    port: int
    host: str
    model: str
    model_path: str
    backend: str
    gpu: int
    engine: str
    started_at: float
    log: str
    exit_file: str
    argv: tuple[str, ...]
    kind: str = "worker"  # "cluster": a llama-server coordinator of a model split over nodes (rbee_tui/cluster/)
    predicted_bytes: int = 0  # what the memory model said it will hold (rbee_tui/capacity.py); 0: not predicted

    @property
    def url(self) -> str:
        """Where the worker listens."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        """The record as stored."""
        out = asdict(self)
        out["argv"] = list(self.argv)
        return out


class Registry:
    """The pool's worker registry file."""

    def __init__(self, pool_id: str) -> None:
        self.pool_id = check_id(pool_id, "pool id")
        self.dir = state_dir() / "pools" / self.pool_id
        self.path = self.dir / "workers.json"
        self.logs = self.dir / "logs"

    def read(self) -> list[WorkerRecord]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except ValueError as exc:
            from rbee_tui.errors import CorruptFileError

            raise CorruptFileError(str(self.path), str(exc), "stop the workers by hand and remove it") from None
        return [WorkerRecord(**{**w, "argv": tuple(w["argv"])}) for w in doc.get("workers", [])]

    def write(self, records: list[WorkerRecord]) -> None:
        files.atomic_write_json(self.path, {"version": 1, "workers": [r.to_json() for r in records]})

    def find(self, worker_id: str) -> WorkerRecord:
        for r in self.read():
            if r.id == worker_id:
                return r
        known = ", ".join(r.id for r in self.read()) or "none"
        raise RbeeError(f"no worker {worker_id!r} in this pool", f"workers: {known}")


# -- process inspection -------------------------------------------------------------------------------------


def _alive(record: WorkerRecord) -> psutil.Process | None:
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
            return None  # the pid was reused, or only a corpse is left
        return proc
    except psutil.NoSuchProcess:
        return None


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of a process group."""
    out = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return out


def _first_child(proc: psutil.Process | None) -> psutil.Process | None:
    if proc is None:
        return None
    try:
        children = proc.children()
        return children[0] if children else None
    except psutil.NoSuchProcess:
        return None


def worker_process(record: WorkerRecord) -> psutil.Process | None:
    """The inference process itself: the supervisor's child, or for the llama-server engine, that rbee-worker's
    child llama-server (the process that holds the model, its memory and its GPU memory) once it runs."""
    top = _first_child(_alive(record))
    if record.engine == ENGINE_SERVER:
        return _first_child(top) or top
    return top


def _rss(proc: psutil.Process) -> int | None:
    """The memory a worker holds: its own and its children's (llama-server is a llama-server worker's child)."""
    try:
        total = proc.memory_info().rss
    except psutil.NoSuchProcess:
        return None
    with contextlib.suppress(psutil.Error):
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
    return int(total)


def memory_in_use(records: list[WorkerRecord]) -> tuple[int, int]:
    """What a pool's live workers hold, for the room a new one has: (in use, still to come).

    In use: each worker's RSS or its prediction, whichever is larger (a worker that has not yet served a long
    prompt holds less than it will). Still to come: what the workers still loading are predicted to take beyond
    what they hold now, which the node's available memory does not show yet.
    """
    used = coming = 0
    for record in records:
        supervisor = _alive(record)
        if supervisor is None:
            continue
        top = _first_child(supervisor)
        rss = (_rss(top) or 0) if top is not None else 0
        used += max(rss, record.predicted_bytes)
        coming += max(record.predicted_bytes - rss, 0)
    return used, coming


def tail(path: str | Path, n: int = 5) -> list[str]:
    """The last `n` lines of a log file."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return []
    return lines[-n:]


def _exit_info(record: WorkerRecord) -> dict[str, Any]:
    try:
        return json.loads(Path(record.exit_file).read_text())
    except (FileNotFoundError, ValueError):
        return {"exit_code": None, "signal": None}


def failure_reason(record: WorkerRecord) -> str:
    """One line saying why a worker ended: its own error line, else the last line of its log."""
    lines = tail(record.log, 50)
    for line in reversed(lines):
        if "rbee-worker: error:" in line:
            return line.split("rbee-worker: error:", 1)[1].strip()
    info = _exit_info(record)
    how = f"killed by signal {info['signal']}" if info.get("signal") else f"exit code {info.get('exit_code')}"
    last = next((ln for ln in reversed(lines) if ln.strip()), "")
    return f"{how}: {last}" if last else how


def describe(record: WorkerRecord, probe: bool = True) -> dict[str, Any]:
    """A record with its live state: loading/ready/busy/starting, or exited with its exit code and last log lines."""
    out = record.to_json()
    out["url"] = record.url
    out["uptime_s"] = round(time.time() - record.started_at, 1)
    sup = _alive(record)
    if sup is None:
        info = _exit_info(record)
        out.update(
            state="exited",
            exit_code=info.get("exit_code"),
            signal=info.get("signal"),
            reason=failure_reason(record),
            last_log=tail(record.log, 5),
        )
        return out
    proc = worker_process(record)
    out["worker_pid"] = proc.pid if proc else None
    top = _first_child(_alive(record))
    out["rss_bytes"] = _rss(top) if top else None
    if probe:
        state, body = probe_health(record.url, record.engine)
        out["state"] = state
        if "queue" in body:
            out["queue"] = body["queue"]
    else:
        out["state"] = "running"
    return out


# -- spawn ------------------------------------------------------------------------------------------------
