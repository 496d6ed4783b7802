"""The job board's service: the planned cells, each cell's latest job, and the run going on. No UI imports.

The board reports through one callback with the key of the cell that changed (None: the whole board); the
job board screen and the capacity view render what they read here (the capacity view through `Capacity`, plain
data built from the jobs' measurements and the stored packing results).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbee_tui.config import MatrixConfig
from rbee_tui.errors import RbeeError
from rbee_tui.matrix.capacity_data import Capacity, cell_capacity, packing_of
from rbee_tui.matrix.plan import Cell
from rbee_tui.matrix.scheduler import MatrixRunner
from rbee_tui.matrix.store import FINAL, Store
from rbee_tui.matrix.survey import gather_plan
from rbee_tui.matrix.sweep import with_engines
from rbee_tui.pools.client import PoolClient

AGAIN = ("failed", "pool lost", "cancelled", "interrupted")  # what "retry failed" runs again
RUNS_LOOKED_AT = 50  # the capacity view looks this far back for a run that swept or measured memory


@dataclass
class CellJob:
    """A cell's latest job as the board shows it."""

    state: str
    reason: str = ""
    job_id: int | None = None
    measurements: dict[str, Any] = field(default_factory=dict)


class MatrixBoard:
    """Plans, runs, cancels and clears the matrix; keeps the latest job of every cell."""

    def __init__(
        self,
        clients: Callable[[], dict[str, PoolClient]],
        settings: Callable[[], MatrixConfig],
        on_change: Callable[[str | None], None],
        on_error: Callable[[str], None],
        db: Path | None = None,
        save_concurrency: Callable[[tuple[int, ...]], None] | None = None,
    ) -> None:
        self._clients = clients
        self._settings = settings
        self._save_concurrency = save_concurrency
        self._on_change = on_change
        self._on_error = on_error
        self.db = db
        self.cells: list[Cell] = []
        self.jobs: dict[str, CellJob] = {}  # cell key -> latest job
        self.run_id: int | None = None
        self.runner: MatrixRunner | None = None
        self.task: asyncio.Task[None] | None = None
        self.started = 0.0
        self._store: Store | None = None
        self._keys: dict[int, str] = {}  # job id -> cell key

    @property
    def store(self) -> Store:
        """The results database for reading, opened on first use (blocking: for scripts and tests; the screens
        read through `details` and `export` in threads, and a run writes through its own writer thread)."""
        if self._store is None:
            self._store = Store(self.db)
        return self._store

    @property
    def running(self) -> bool:
        """Whether a run is going on."""
        return self.task is not None and not self.task.done()

    def state(self, key: str) -> str:
        """A cell's state as shown everywhere: its job's, else what the plan says it would be, else not run."""
        job = self.jobs.get(key)
        if job is not None:
            return job.state
        cell = next((c for c in self.cells if c.key == key), None)
        return cell.initial_state if cell is not None and cell.skip else "not run"

    async def plan(self) -> list[Cell]:
        """Plan the matrix from the pools' catalogs and status (the config's [matrix] narrows it)."""
        cfg = self._settings()
        everyone = self._clients()
        wanted = {n for cluster in cfg.clusters for n in cluster if n in everyone}
        plain = {n for n in everyone if not cfg.pools or n in cfg.pools}
        clusters = [c for c in cfg.clusters if all(n in everyone for n in c)]
        clients = {n: c for n, c in everyone.items() if n in plain | wanted}
        _, cells = await gather_plan(clients, list(cfg.models) or None, clusters, plain)
        self.cells = with_engines(cells, cfg.engines)  # a column per worker engine when [matrix] engines names two
        self._on_change(None)
        return self.cells

    def start(self, cells: list[Cell], new_run: bool = False) -> None:
        """Run these cells inside the current run (retries and partial runs add up on one board), or in a new
        run: the board then shows only the new run's jobs."""
        if self.running:
            raise RbeeError("a matrix run is already going", "cancel it first (x)")
        if not cells:
            raise RbeeError("nothing to run there")
        settings = self._settings()
        self.runner = MatrixRunner(
            self._clients(),
            self.db,
            max_tokens=settings.max_tokens,
            cluster_ctx=settings.cluster_ctx,
            on_change=self._changed,
            concurrency=settings.concurrency,
        )
        self.started = time.time()
        if new_run:
            self.run_id = None
            self.jobs.clear()
        for cell in cells:
            self.jobs[cell.key] = CellJob(cell.initial_state, cell.skip)
        # Stored with the run, as the headless run does: what its sweep levels were.
        recorded: dict[str, Any] = {"source": "dashboard"}
        if settings.concurrency:
            recorded["concurrency"] = list(settings.concurrency)
        if settings.engines:
            recorded["engines"] = list(settings.engines)
        self.task = asyncio.create_task(self._go(self.runner, cells, recorded), name="matrix")

    async def _go(self, runner: MatrixRunner, cells: list[Cell], recorded: dict[str, Any]) -> None:
        try:
            self.run_id = await runner.run(cells, recorded, run_id=self.run_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported on the board and in the error log
            self._on_error(f"matrix run failed: {exc}")
        finally:
            self._on_change(None)

    def _changed(self, job: dict[str, Any]) -> None:
        if "cell" in job:  # a job (re)starts: nothing of the cell's previous job carries over
            self._keys[job["job_id"]] = job["cell"]
            self.run_id = job["run_id"]
            self.jobs[job["cell"]] = CellJob(job["state"], job.get("reason", ""), job["job_id"])
            self._on_change(job["cell"])
            return
        key = self._keys.get(job["job_id"])
        if key is None:
            return
        current = self.jobs[key]
        current.state, current.reason = job["state"], job.get("reason", "")
        current.measurements.update(
            {k: v for k, v in job.items() if k not in ("state", "reason", "job_id", "run_id", "cell")}
        )
        self._on_change(key)

    def cancel(self) -> None:
        """Cancel the run: its workers are stopped."""
        if self.runner is not None and self.running:
            self.runner.cancel()

    async def stop(self) -> None:
        """Cancel the run and wait until every worker it started is stopped."""
        task = self.task
        if task is None or task.done():
            return
        self.cancel()
        await asyncio.wait({task}, timeout=60)

    def clear(self) -> None:
        """Forget the board (the store keeps every run); the next run starts a new one."""
        if self.running:
            raise RbeeError("cancel the run before clearing the board")
        self.jobs.clear()
        self.run_id = None
        self._on_change(None)

    def counts(self) -> dict[str, int]:
        """Cells by state."""
        states = [self.state(c.key) for c in self.cells]
        return {
            "total": len(self.cells),
            "done": sum(s in FINAL for s in states),
            "passed": states.count("passed"),
            "failed": states.count("failed"),
            "skipped": states.count("skipped"),
            "pool lost": states.count("pool lost"),
            "cancelled": states.count("cancelled") + states.count("interrupted"),
        }

    def eta_s(self) -> float | None:
        """Time left: the mean time of finished jobs times the jobs left, spread over the pools running them."""
        c = self.counts()
        finished = c["passed"] + c["failed"]
        if not self.running or not finished:
            return None
        per_job = (time.time() - self.started) / finished
        left = [k for k, j in self.jobs.items() if j.state not in FINAL]
        pools = len({k.rsplit("@", 1)[-1] for k in left}) or 1
        return per_job * len(left) / pools

    def retry_cells(self) -> list[Cell]:
        """Every failed, lost or cancelled cell."""
        return [c for c in self.cells if self.state(c.key) in AGAIN]

    def export(self, formats: list[str], out: Path) -> list[Path]:
        """Write the current run's tables (blocking: call it from a thread)."""
        from rbee_tui.matrix import export

        if self.run_id is None:
            raise RbeeError("no run to export yet", "run the matrix first (a)")
        store = Store(self.db)  # its own connection: this runs on another thread than the runner's
        try:
            return export.write(store.run(self.run_id), store.jobs(self.run_id), formats, out)
        finally:
            store.close()

    def details(self, key: str) -> dict[str, Any]:
        """A cell's job: measurements, timeline, log tail, and the previous run's tokens/s (blocking: call it
        from a thread)."""
        job = self.jobs.get(key)
        if job is None or job.job_id is None or self.run_id is None:
            return {"cell": key, "state": self.state(key), "reason": job.reason if job else self._skip(key)}
        store = Store(self.db)
        try:
            row = next((j for j in store.jobs(self.run_id) if j["id"] == job.job_id), None) or {}
            # The state is the board's: the store may still be behind it, its writes queued behind another
            # process's lock.
            return {
                "cell": key,
                "state": job.state,
                "reason": job.reason,
                "measurements": {**row.get("measurements", {}), **job.measurements},
                "log_tail": row.get("log_tail", ""),
                "timeline": store.events(job.job_id),
                "previous": store.previous(self.run_id, key),
            }
        finally:
            store.close()

    def _skip(self, key: str) -> str:
        return next((c.skip for c in self.cells if c.key == key), "")

    # -- the capacity lab ----------------------------------------------------------------------------------

    @property
    def concurrency(self) -> tuple[int, ...]:
        """The concurrency levels the next run sweeps (empty: none)."""
        return tuple(self._settings().concurrency)

    def set_concurrency(self, levels: tuple[int, ...]) -> None:
        """Save the levels the next runs sweep in the config's [matrix] (blocking: call it from a thread)."""
        if self._save_concurrency is None:
            raise RbeeError("this board has no config file to save the concurrency levels in")
        self._save_concurrency(levels)

    def capacity(self) -> Capacity:
        """The board's own run as the capacity view draws it (in memory: no I/O)."""
        cells = []
        for key, job in self.jobs.items():
            entry = cell_capacity(key, job.state, job.measurements)
            if entry is not None:
                cells.append(entry)
        return Capacity(self.run_id, False, tuple(cells))

    def stored_capacity(self) -> Capacity:
        """The latest stored run that swept or measured memory, and the packing results stored with the latest
        runs (blocking: call it from a thread)."""
        try:
            return self._stored_capacity()
        except sqlite3.Error as exc:  # busy past the timeout, or not a database: the view says so
            raise RbeeError(f"could not read the results database: {exc}", "rbee-tui matrix runs checks it") from exc

    def _stored_capacity(self) -> Capacity:
        store = Store(self.db)
        try:
            runs = [r["id"] for r in store.runs()[:RUNS_LOOKED_AT]]
            run_id, cells = None, []
            for run in runs:
                jobs = store.jobs(run)
                cells = [c for j in jobs if (c := cell_capacity(j["cell"], j["state"], j["measurements"]))]
                if cells:
                    run_id = run
                    break
            packings = tuple(packing_of(raw, run) for run in runs for raw in store.packings(run))
        finally:
            store.close()
        return Capacity(run_id, True, tuple(cells), packings)
