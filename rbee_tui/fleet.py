"""The dashboard's service layer: every pool's client, downloads, workers and prompts. No UI imports here.

The app calls these methods and renders what they report through one callback of `FleetEvent`s; it never
does I/O itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from rbee_tui import config as cfgmod
from rbee_tui.config import Config, PoolConfig
from rbee_tui.errors import RbeeError
from rbee_tui.matrix.store import FINAL
from rbee_tui.names import check_backends, check_id, check_repo, check_repo_file
from rbee_tui.pools.client import PoolClient, PoolEvent
from rbee_tui.worker.client import execute


@dataclass
class Download:
    """One download as the Downloads pane lists it; finished and failed ones stay listed."""

    pool: str
    model: str
    state: str = "starting"  # starting, running, done, failed, cancelled
    bytes_done: int = 0
    bytes_total: int = 0
    speed_bps: float = 0.0
    eta_s: float | None = None
    error: str = ""
    started: float = field(default_factory=time.time)
    task: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        """Unique per pool and model."""
        return f"{self.pool}/{self.model}"


@dataclass
class FleetEvent:
    """Something the screen should re-render: `kind` is state, sample, workers, catalog, download, error."""

    kind: str
    pool: str = ""
    data: Any = None


class Fleet:
    """Owns a PoolClient per configured pool, and the work the dashboard starts on them."""

    def __init__(self, config: Config, on_event: Callable[[FleetEvent], None], **client_options: Any) -> None:
        self.config = config
        self.on_event = on_event
        self.client_options = client_options
        self.clients: dict[str, PoolClient] = {}
        self.catalogs: dict[str, dict[str, Any]] = {}
        self.downloads: dict[str, Download] = {}
        self.last_tps: dict[tuple[str, str], float] = {}
        self.pending: dict[str, list[dict[str, Any]]] = {}
        self.matrix = MatrixBoard(self)
        self._tasks: set[asyncio.Task[Any]] = set()
        for pool in config.pools:
            self._add_client(pool)

    def _add_client(self, pool: PoolConfig) -> PoolClient:
        client = PoolClient(pool, **self.client_options)
        client.listeners.append(self._relay)
        self.clients[pool.name] = client
        return client

    def _background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)  # keep a reference: the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)

    def _relay(self, event: PoolEvent) -> None:
        self.on_event(FleetEvent(event.kind, event.pool, event.data))
        if event.kind == "state" and event.data[0] == "connected":
            self._background(self._quietly(self.refresh_catalog(event.pool)))

    async def _quietly(self, coro: Any) -> None:
        try:
            await coro
        except RbeeError as exc:
            self.on_event(FleetEvent("error", "", str(exc)))

    def start(self) -> None:
        """Connect every pool in the background."""
        for client in self.clients.values():
            client.start()

    async def close(self) -> None:
        """Cancel downloads in flight and close every connection."""
        for d in self.downloads.values():
            if d.task is not None and not d.task.done():
                d.task.cancel()
        await asyncio.gather(*(c.close() for c in self.clients.values()), return_exceptions=True)

    def client(self, pool: str) -> PoolClient:
        """The client of `pool`."""
        if pool not in self.clients:
            raise RbeeError(f"no pool named {pool!r}")
        return self.clients[pool]

    # -- catalog ------------------------------------------------------------------------------------------

    async def refresh_catalog(self, pool: str) -> dict[str, Any]:
        """Fetch a pool's catalog and report it."""
        doc = await self.client(pool).hive("models", "catalog")
        self.catalogs[pool] = doc
        self.on_event(FleetEvent("catalog", pool, doc))
        return doc

    def pools_having(self, model_id: str) -> list[str]:
        """Pools whose catalog has `model_id` downloaded."""
        return [
            p
            for p, doc in self.catalogs.items()
            if any(m["id"] == model_id and m["downloaded"] for m in doc.get("models", []))
        ]

    async def register(
        self, pool: str, model_id: str, repo: str, file: str, name: str = "", architecture: str = "", backends: str = ""
    ) -> None:
        """Register a model on a pool, validating the fields here first."""
        check_id(model_id)
        check_repo(repo)
        check_repo_file(file)
        args = ["models", "register", model_id, "--repo", repo, "--file", file]
        if name:
            args += ["--name", name]
        if architecture:
            args += ["--architecture", architecture]
        if backends:
            check_backends([b.strip() for b in backends.split(",") if b.strip()])
            args += ["--backends", ",".join(b.strip() for b in backends.split(",") if b.strip())]
        await self.client(pool).hive(*args)
        await self.refresh_catalog(pool)

    async def unregister(self, pool: str, model_id: str) -> None:
        """Remove a model from a pool's catalog."""
        await self.client(pool).hive("models", "unregister", check_id(model_id))
        await self.refresh_catalog(pool)

    async def verify(self, pool: str, model_id: str) -> dict[str, Any]:
        """Re-check a model's files on a pool."""
        try:
            result = await self.client(pool).hive("models", "verify", check_id(model_id))
        finally:
            await self.refresh_catalog(pool)
        return result

    # -- downloads ----------------------------------------------------------------------------------------

    def download(self, pool: str, model_id: str) -> Download:
        """Start downloading a model on a pool (in the background); a running one is returned as it is."""
        check_id(model_id)
        key = f"{pool}/{model_id}"
        current = self.downloads.get(key)
        if current is not None and current.state in ("starting", "running"):
            return current
        d = Download(pool, model_id)
        self.downloads[key] = d
        d.task = asyncio.create_task(self._run_download(d), name=f"download:{key}")
        self.on_event(FleetEvent("download", pool, d))
        return d

    async def _run_download(self, d: Download) -> None:
        try:
            async for ev in self.client(d.pool).hive_stream("models", "download", d.model):
                if ev.get("event") == "progress":
                    d.state = "running"
                    d.bytes_done, d.bytes_total = ev["bytes_done"], ev["bytes_total"]
                    d.speed_bps, d.eta_s = ev["speed_bps"], ev["eta_s"]
                elif ev.get("event") == "done":
                    d.state = "done"
                    d.bytes_done = d.bytes_total = ev["size_bytes"]
                    d.eta_s = 0.0
                elif ev.get("event") in ("error", "cancelled"):
                    d.state = "failed" if ev["event"] == "error" else "cancelled"
                    d.error = ev.get("error", "")
                self.on_event(FleetEvent("download", d.pool, d))
            if d.state not in ("done", "failed", "cancelled"):
                d.state, d.error = "failed", "the download ended without a result"
        except asyncio.CancelledError:
            d.state, d.error = "cancelled", "cancelled; the bytes received are kept for a resume"
        except RbeeError as exc:
            d.state, d.error = "failed", str(exc)
        self.on_event(FleetEvent("download", d.pool, d))
        if d.state == "failed":
            self.on_event(FleetEvent("error", d.pool, f"download of {d.model} failed: {d.error}"))
        with contextlib.suppress(RbeeError):
            await self.refresh_catalog(d.pool)

    def cancel_download(self, key: str) -> None:
        """Stop a download; its bytes stay on the node for the next attempt."""
        d = self.downloads.get(key)
        if d is not None and d.task is not None and not d.task.done():
            d.task.cancel()

    # -- workers ------------------------------------------------------------------------------------------

    async def spawn(self, pool: str, backend: str, model_id: str, gpu: int = 0) -> dict[str, Any]:
        """Spawn a worker and wait until it is ready (its loading shows in the workers list meanwhile)."""
        client = self.client(pool)
        check_backends([backend])
        args = ["worker", "spawn", backend, "--model", check_id(model_id), "--gpu", str(int(gpu)), "--json"]
        # Shown at once as "spawning", so the table answers the click before the node does.
        pending = {
            "id": f"spawning-{model_id}",
            "model": model_id,
            "backend": backend,
            "gpu": gpu,
            "port": "-",
            "state": "spawning",
            "started_at": time.time(),
            "engine": "-",
        }
        self.pending.setdefault(pool, []).append(pending)
        self.on_event(FleetEvent("workers", pool, None))
        try:
            w = await client.hive(*args)
        finally:
            self.pending[pool].remove(pending)
        await client.workers()
        try:
            await client.wait_worker_ready(w["id"])
        finally:
            await client.workers()
        return w

    async def stop(self, pool: str, worker_id: str) -> None:
        """Stop a worker."""
        await self.client(pool).stop_worker(worker_id)

    async def prompt(self, pool: str, worker_id: str, text: str, max_tokens: int = 64) -> AsyncIterator[dict[str, Any]]:
        """Stream a reply from a worker: token events, then the summary."""
        import aiohttp

        client = self.client(pool)
        worker = next((w for w in client.view.workers if w["id"] == worker_id), None)
        if worker is None:
            raise RbeeError(f"no worker {worker_id} on {pool}")
        url = await client.worker_url(worker)
        body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0.7}
        async with aiohttp.ClientSession() as session:
            try:
                async for ev in execute(session, url, worker["engine"], body):
                    if ev["event"] == "done":
                        self.last_tps[(pool, worker_id)] = ev["tokens_per_sec"]
                    yield ev
            except (aiohttp.ClientError, RuntimeError) as exc:
                raise RbeeError(f"{worker_id}: {exc}") from None

    async def log_lines(self, pool: str, worker_id: str) -> AsyncIterator[str]:
        """A worker's log, then its new lines as they come."""
        async for ev in self.client(pool).hive_stream("worker", "logs", check_id(worker_id, "worker id"), "--follow"):
            if "line" in ev:
                yield ev["line"]

    # -- config -------------------------------------------------------------------------------------------

    def save_pool(self, pool: PoolConfig) -> None:
        """Add or replace a pool in the config file and connect to it."""
        self.config = self.config.with_pool(pool)
        cfgmod.save(self.config)
        old = self.clients.pop(pool.name, None)
        if old is not None:
            self._background(old.close())
        self._add_client(pool).start()

    async def trust(self, pool: str) -> str:
        """Accept a pool's current host key (the user saw its fingerprint); the pool then reconnects."""
        from rbee_tui.pools.hostkeys import trust

        return await trust(self.client(pool).pool)

    async def host_key_fingerprint(self, pool: str) -> str:
        """The fingerprint of the key a pool's server presents."""
        from rbee_tui.pools.hostkeys import server_key

        return (await server_key(self.client(pool).pool)).get_fingerprint("sha256")

    def set_theme(self, theme: str) -> None:
        """Remember the theme in the config file."""
        self.config = replace(self.config, theme=theme)
        cfgmod.save(self.config)


class MatrixBoard:
    """The job board's state: the planned cells, each cell's latest job, and the run going on."""

    def __init__(self, fleet: Fleet, db: Any = None) -> None:
        self.fleet = fleet
        self.db = db
        self.cells: list[Any] = []
        self.jobs: dict[str, dict[str, Any]] = {}  # cell key -> latest job row
        self.run_id: int | None = None
        self.runner: Any = None
        self.task: asyncio.Task[Any] | None = None
        self.started = 0.0
        self._store: Any = None
        self._keys: dict[int, str] = {}

    @property
    def store(self) -> Any:
        """The results database (opened on first use)."""
        if self._store is None:
            from rbee_tui.matrix.store import Store

            self._store = Store(self.db)
        return self._store

    @property
    def running(self) -> bool:
        """Whether a run is going on."""
        return self.task is not None and not self.task.done()

    async def plan(self) -> list[Any]:
        """Plan the matrix from the pools' catalogs and status (the config's [matrix] narrows it)."""
        from rbee_tui.matrix.headless import gather_plan

        cfg = self.fleet.config.matrix
        clients = {n: c for n, c in self.fleet.clients.items() if not cfg.pools or n in cfg.pools}
        _, self.cells = await gather_plan(clients, list(cfg.models) or None)
        self.fleet.on_event(FleetEvent("matrix", "", None))
        return self.cells

    def start(self, cells: list[Any]) -> None:
        """Run these cells (inside the current run, so retries and partial runs add up on one board)."""
        from rbee_tui.matrix.scheduler import MatrixRunner

        if self.running:
            raise RbeeError("a matrix run is already going", "cancel it first (x)")
        if not cells:
            raise RbeeError("nothing to run there")
        self.runner = MatrixRunner(
            self.fleet.clients, self.store, max_tokens=self.fleet.config.matrix.max_tokens, on_change=self._changed
        )
        self.started = time.time()

        async def go() -> None:
            try:
                self.run_id = await self.runner.run(cells, {"source": "dashboard"}, run_id=self.run_id)
            except Exception as exc:  # reported on the board and in the error log
                self.fleet.on_event(FleetEvent("error", "", f"matrix run failed: {exc}"))
            self.fleet.on_event(FleetEvent("matrix", "", None))

        for cell in cells:
            self.jobs[cell.key] = {
                "state": "queued" if not cell.skip else "skipped",
                "reason": cell.skip,
                "measurements": {},
            }
        self.task = asyncio.create_task(go(), name="matrix")

    def _changed(self, job: dict[str, Any]) -> None:
        if "cell" in job:
            self._keys[job["job_id"]] = job["cell"]
            self.run_id = job["run_id"]
        key = self._keys.get(job["job_id"])
        if key is None:
            return
        current = self.jobs.setdefault(key, {"measurements": {}})
        current.update(state=job["state"], reason=job.get("reason", ""), job_id=job["job_id"])
        current["measurements"] = {
            **current.get("measurements", {}),
            **{k: v for k, v in job.items() if k not in ("state", "reason", "job_id", "run_id", "cell")},
        }
        self.fleet.on_event(FleetEvent("matrix", "", key))

    def cancel(self) -> None:
        """Cancel the run."""
        if self.runner is not None and self.running:
            self.runner.cancel()

    def clear(self) -> None:
        """Forget the board (the store keeps every run); the next run starts a new one."""
        if self.running:
            raise RbeeError("cancel the run before clearing the board")
        self.jobs.clear()
        self.run_id = None
        self.fleet.on_event(FleetEvent("matrix", "", None))

    def counts(self) -> dict[str, int]:
        """Cells by outcome."""
        states = [self.jobs.get(c.key, {}).get("state", "not run") for c in self.cells]
        done = sum(s in FINAL for s in states)
        return {
            "total": len(self.cells),
            "done": done,
            "passed": states.count("passed"),
            "failed": states.count("failed"),
            "skipped": states.count("skipped"),
            "lost": states.count("pool lost"),
        }

    def eta_s(self) -> float | None:
        """Time left: the mean time of finished jobs times the jobs left, spread over the pools running them."""
        c = self.counts()
        finished = c["passed"] + c["failed"]
        if not self.running or not finished:
            return None
        per_job = (time.time() - self.started) / finished
        left = [k for k, j in self.jobs.items() if j.get("state") not in FINAL]
        pools = len({k.rsplit("@", 1)[-1] for k in left}) or 1
        return per_job * len(left) / pools

    def export(self, formats: list[str], out: Any) -> list[Any]:
        """Write the current run's tables."""
        from rbee_tui.matrix import export

        if self.run_id is None:
            raise RbeeError("no run to export yet")
        return export.write(self.store.run(self.run_id), self.store.jobs(self.run_id), formats, out)

    def details(self, key: str) -> dict[str, Any]:
        """A cell's job: measurements, timeline, log tail, and the previous run's tokens/s."""
        job = self.jobs.get(key)
        if job is None or "job_id" not in job or self.run_id is None:
            return {"cell": key, "state": (job or {}).get("state", "not run"), "reason": (job or {}).get("reason", "")}
        row = next((j for j in self.store.jobs(self.run_id) if j["id"] == job["job_id"]), None) or {}
        return {
            "cell": key,
            "state": row.get("state"),
            "reason": row.get("reason", ""),
            "measurements": row.get("measurements", {}),
            "log_tail": row.get("log_tail", ""),
            "timeline": self.store.events(job["job_id"]),
            "previous": self.store.previous(self.run_id, key),
        }
