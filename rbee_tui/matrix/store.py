"""Matrix results in SQLite (WAL): runs, jobs with every state change and measurement. Survives crashes.

A run writes through one StoreWriter: a thread that owns its own connection and applies the writes in order, so
an event loop never waits on the database's lock (another process's run may hold it for a while).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import queue
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rbee_tui.config import data_dir
from rbee_tui.errors import CorruptFileError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    finished_at REAL,
    state TEXT NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    cell TEXT NOT NULL,
    model TEXT NOT NULL,
    pool TEXT NOT NULL,
    backend TEXT NOT NULL,
    gpu INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    measurements TEXT NOT NULL DEFAULT '{}',
    log_tail TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    UNIQUE (run_id, cell)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    at REAL NOT NULL,
    state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS packings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    at REAL NOT NULL,
    pool TEXT NOT NULL,
    result TEXT NOT NULL
);
"""
FINAL = ("passed", "failed", "skipped", "pool lost", "cancelled", "interrupted")


def _process_tag(pid: int) -> str:
    """host:pid:start time, so a pid reused by another process after a reboot or wrap is not taken for ours."""
    import psutil

    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        started = 0.0
    return f"{socket.gethostname()}:{pid}:{started:.0f}"


_OWNER = _process_tag(os.getpid())


def _owner_alive(owner: str) -> bool:
    """Whether the process that wrote `owner` still runs (a run of another host counts as alive: not ours to
    judge)."""
    host, _, rest = owner.partition(":")
    pid, _, _ = rest.partition(":")
    if not owner or not pid.isdigit():
        return False
    if host != socket.gethostname():
        return True
    return _process_tag(int(pid)) == owner


def _locked(exc: sqlite3.DatabaseError) -> bool:
    """Whether SQLite refused because another connection holds the lock (busy, not broken)."""
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


def default_path() -> Path:
    """$XDG_DATA_HOME/rbee/results.db."""
    return data_dir() / "results.db"


class Store:
    """One SQLite database; every write is its own transaction, so a crash loses at most the step in progress."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path or default_path())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            if _locked(exc):
                raise  # busy, not corrupt: another process holds the lock for longer than the busy timeout
            raise CorruptFileError(str(self.path), str(exc), "move it away to start a new results database") from None
        self.db.row_factory = sqlite3.Row
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(runs)")}
        if "owner" not in columns:  # databases written before runs knew their process
            self.db.execute("ALTER TABLE runs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
        self._recover()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic write. BEGIN IMMEDIATE takes the write lock at the start, where the busy timeout applies
        (a read that turns into a write later can fail at once instead); inside an open transaction, a savepoint."""
        if self.db.in_transaction:
            self.db.execute("SAVEPOINT write")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK TO write")
                self.db.execute("RELEASE write")
                raise
            self.db.execute("RELEASE write")
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _recover(self) -> None:
        """A run whose process died is marked interrupted, its finished cells kept. A run another live process
        is running (a headless run beside a dashboard) is left alone."""
        running = self.db.execute("SELECT id, owner FROM runs WHERE state = 'running'").fetchall()
        if all(_owner_alive(r["owner"]) for r in running):
            return  # nothing to mark: no write, so no wait on another process's lock
        with self.transaction():
            stale = [
                r["id"]
                for r in self.db.execute("SELECT id, owner FROM runs WHERE state = 'running'")
                if not _owner_alive(r["owner"])
            ]
            for run_id in stale:
                marks = ",".join("?" * len(FINAL))
                query = f"SELECT id FROM jobs WHERE run_id = ? AND state NOT IN ({marks})"
                for job in self.db.execute(query, (run_id, *FINAL)).fetchall():
                    self._set(job["id"], "interrupted", "the run stopped before this cell finished")
                self.db.execute(
                    "UPDATE runs SET state = 'interrupted', finished_at = ? WHERE id = ?", (time.time(), run_id)
                )

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def new_run(self, settings: dict[str, Any]) -> int:
        """Start a run; returns its id."""
        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO runs (started_at, state, settings, owner) VALUES (?, 'running', ?, ?)",
                (time.time(), json.dumps(settings), _OWNER),
            )
        return int(cur.lastrowid or 0)

    def finish_run(self, run_id: int, state: str = "finished") -> None:
        """Close a run."""
        with self.transaction():
            self.db.execute("UPDATE runs SET state = ?, finished_at = ? WHERE id = ?", (state, time.time(), run_id))

    def add_job(self, run_id: int, cell: Any) -> int:
        """A job for a cell (queued, or skipped with its reason); returns the job id. A cell run again inside
        the same run is reset in place: one job per cell and run, so the board, the details and the exports
        read the same row."""
        state, reason = cell.initial_state, cell.skip
        with self.transaction():
            row = self.db.execute(
                "INSERT INTO jobs (run_id, cell, model, pool, backend, gpu, state, reason, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, cell) DO UPDATE SET state = excluded.state, "
                "reason = excluded.reason, measurements = '{}', log_tail = '', updated_at = excluded.updated_at "
                "RETURNING id",
                (run_id, cell.key, cell.model, cell.pool, cell.backend, cell.gpu, state, reason, time.time()),
            ).fetchone()
            job_id = int(row[0])
            self.db.execute(
                "INSERT INTO events (job_id, at, state, detail) VALUES (?, ?, ?, ?)",
                (job_id, time.time(), state, reason),
            )
        return job_id

    def add_jobs(self, run_id: int, cells: list[Any]) -> list[int]:
        """A job for each cell, in one transaction; returns their ids in the cells' order."""
        with self.transaction():
            return [self.add_job(run_id, cell) for cell in cells]

    def reopen_run(self, run_id: int) -> None:
        """Run more cells inside a finished run (a retry on the board): it is running again until they end."""
        with self.transaction():
            self.db.execute(
                "UPDATE runs SET state = 'running', finished_at = NULL, owner = ? WHERE id = ?", (_OWNER, run_id)
            )

    def _set(self, job_id: int, state: str, reason: str = "", **measurements: Any) -> None:
        row = self.db.execute("SELECT measurements FROM jobs WHERE id = ?", (job_id,)).fetchone()
        merged = {**json.loads(row["measurements"] if row else "{}"), **measurements}
        self.db.execute(
            "UPDATE jobs SET state = ?, reason = ?, measurements = ?, updated_at = ? WHERE id = ?",
            (state, reason, json.dumps(merged), time.time(), job_id),
        )
        self.db.execute(
            "INSERT INTO events (job_id, at, state, detail) VALUES (?, ?, ?, ?)", (job_id, time.time(), state, reason)
        )

    def set_state(self, job_id: int, state: str, reason: str = "", log_tail: str = "", **measurements: Any) -> None:
        """Record a state change (and any measurements taken so far)."""
        with self.transaction():
            self._set(job_id, state, reason, **measurements)
            if log_tail:
                self.db.execute("UPDATE jobs SET log_tail = ? WHERE id = ?", (log_tail, job_id))

    def jobs(self, run_id: int) -> list[dict[str, Any]]:
        """Every job of a run with its measurements."""
        rows = self.db.execute("SELECT * FROM jobs WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()
        return [{**dict(r), "measurements": json.loads(r["measurements"])} for r in rows]

    def events(self, job_id: int) -> list[dict[str, Any]]:
        """A job's timeline."""
        return [
            dict(r)
            for r in self.db.execute("SELECT at, state, detail FROM events WHERE job_id = ? ORDER BY id", (job_id,))
        ]

    def run(self, run_id: int) -> dict[str, Any]:
        """A run's row, with its packing results (`packings`: what `capacity pack` stored with it)."""
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if not row:
            return {}
        return {**dict(row), "settings": json.loads(row["settings"]), "packings": self.packings(run_id)}

    def add_packing(self, run_id: int, result: dict[str, Any]) -> int:
        """Keep a packing result (matrix/packing.py's shape) with a run; its id."""
        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO packings (run_id, at, pool, result) VALUES (?, ?, ?, ?)",
                (run_id, time.time(), result.get("pool", ""), json.dumps(result)),
            )
        return int(cur.lastrowid or 0)

    def packings(self, run_id: int) -> list[dict[str, Any]]:
        """A run's packing results, oldest first."""
        try:
            found = self.db.execute("SELECT result FROM packings WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # a database from before packing, opened read-only: none
                return []
            raise
        return [json.loads(r["result"]) for r in found]

    def runs(self) -> list[dict[str, Any]]:
        """Every run, newest first."""
        return [dict(r) for r in self.db.execute("SELECT * FROM runs ORDER BY id DESC")]

    def previous(self, run_id: int, cell: str) -> dict[str, Any] | None:
        """The same cell's passed job in the latest earlier run (to compare tokens/s now vs then)."""
        row = self.db.execute(
            "SELECT measurements FROM jobs WHERE run_id < ? AND cell = ? AND state = 'passed' "
            "ORDER BY run_id DESC LIMIT 1",
            (run_id, cell),
        ).fetchone()
        return json.loads(row["measurements"]) if row else None


_Write = tuple[Callable[..., Any], tuple[Any, ...], concurrent.futures.Future[Any]]


class StoreWriter:
    """The one writer of a run: a thread that owns its own connection applies every write in the order given.

    Callers never wait on SQLite: `call` is awaited only for what a run needs back (its id, its jobs' ids);
    `submit` queues a write and returns at once. While another process holds the database's lock, the writes
    wait in the queue and go in together once it is free, in their order.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path or default_path())
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._failed: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"matrix-store:{self.path.name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Queue `fn(store, *args)`; returns at once. A failure is kept, and raised by the next `flush`."""
        if self._closed:
            raise RuntimeError("the results writer is closed")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.add_done_callback(self._note_failure)
        self._queue.put((fn, args, future))
        return future

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Queue `fn(store, *args)` and wait, without blocking the loop, for its result."""
        # Shielded: a caller that gives up must not cancel a write that is already on its way.
        return await asyncio.shield(asyncio.wrap_future(self.submit(fn, *args)))

    def set_state(self, job_id: int, state: str, reason: str = "", log_tail: str = "", **measurements: Any) -> None:
        """Queue a job's state change (Store.set_state)."""
        self.submit(lambda store: store.set_state(job_id, state, reason, log_tail, **measurements))

    async def flush(self) -> None:
        """Wait until every write queued so far is committed; raise the first that failed."""
        await self.call(lambda store: None)
        if self._failed is not None:
            raise self._failed

    def close(self) -> None:
        """No more writes: the thread commits what is queued, then closes its connection and ends."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)

    def _note_failure(self, future: concurrent.futures.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None and self._failed is None:
            self._failed = future.exception()

    def _serve(self) -> None:
        store: Store | None = None
        stop = False
        while not stop:
            item = self._queue.get()
            writes: list[_Write] = []
            with contextlib.suppress(queue.Empty):
                while item is not None:
                    writes.append(item)
                    item = self._queue.get_nowait()
            stop = item is None
            if not writes:
                continue
            try:
                store = store or self._open()
                self._apply(store, writes)
            except BaseException as exc:  # the database cannot be opened or written: every caller hears why
                for _, _, future in writes:
                    if not future.done():
                        future.set_exception(exc)
        if store is not None:
            store.close()

    def _open(self) -> Store:
        while True:
            try:
                return Store(self.path)
            except sqlite3.OperationalError as exc:
                if not _locked(exc):
                    raise

    def _apply(self, store: Store, writes: list[_Write]) -> None:
        """The queued writes in one transaction (one wait for the lock), each in its own savepoint so that one
        that fails takes back only itself; results are handed out once committed."""
        while True:
            try:
                store.db.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                # Still held after the busy timeout (a long transaction of another process): keep waiting, on
                # this thread, where nobody is kept waiting.
                if not _locked(exc):
                    raise
        outcomes: list[tuple[concurrent.futures.Future[Any], BaseException | None, Any]] = []
        try:
            for fn, args, future in writes:
                try:
                    with store.transaction():
                        outcomes.append((future, None, fn(store, *args)))
                except Exception as exc:
                    outcomes.append((future, exc, None))
            store.db.execute("COMMIT")
        except BaseException:
            if store.db.in_transaction:
                store.db.execute("ROLLBACK")
            raise
        for future, exc, result in outcomes:
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)
