"""Matrix results in SQLite (WAL): runs, jobs with every state change and measurement. Survives crashes."""

from __future__ import annotations

import json
import sqlite3
import time
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
"""
FINAL = ("passed", "failed", "skipped", "pool lost", "cancelled", "interrupted")


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
            raise CorruptFileError(str(self.path), str(exc), "move it away to start a new results database") from None
        self.db.row_factory = sqlite3.Row
        self._recover()

    def _recover(self) -> None:
        """A run that was going when the process died is marked interrupted, its finished cells kept."""
        with self.db:
            stale = [r["id"] for r in self.db.execute("SELECT id FROM runs WHERE state = 'running'")]
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
        cur = self.db.execute(
            "INSERT INTO runs (started_at, state, settings) VALUES (?, 'running', ?)",
            (time.time(), json.dumps(settings)),
        )
        return int(cur.lastrowid or 0)

    def finish_run(self, run_id: int, state: str = "finished") -> None:
        """Close a run."""
        self.db.execute("UPDATE runs SET state = ?, finished_at = ? WHERE id = ?", (state, time.time(), run_id))

    def add_job(self, run_id: int, cell: Any) -> int:
        """A job for a cell (queued, or skipped with its reason); returns the job id."""
        state, reason = ("skipped", cell.skip) if cell.skip else ("queued", "")
        if cell.skip.startswith("pool lost"):
            state = "pool lost"
        cur = self.db.execute(
            "INSERT INTO jobs (run_id, cell, model, pool, backend, gpu, state, reason, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, cell) DO UPDATE SET state = excluded.state, "
            "reason = excluded.reason, measurements = '{}', log_tail = '', updated_at = excluded.updated_at",
            (run_id, cell.key, cell.model, cell.pool, cell.backend, cell.gpu, state, reason, time.time()),
        )
        job_id = (
            cur.lastrowid
            or self.db.execute("SELECT id FROM jobs WHERE run_id = ? AND cell = ?", (run_id, cell.key)).fetchone()["id"]
        )
        self.db.execute(
            "INSERT INTO events (job_id, at, state, detail) VALUES (?, ?, ?, ?)", (job_id, time.time(), state, reason)
        )
        return int(job_id)

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
        with self.db:
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
        """A run's row."""
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return {**dict(row), "settings": json.loads(row["settings"])} if row else {}

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
