"""The dashboard's service layer: every pool's client, downloads, workers and prompts. No UI imports here.

The app calls these methods and renders what they report through one callback of typed events (below); it
never does I/O itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from rbee_tui import config as cfgmod
from rbee_tui.cluster.board import ClusterBoard
from rbee_tui.config import Config, PoolConfig
from rbee_tui.errors import RbeeError
from rbee_tui.matrix.board import MatrixBoard
from rbee_tui.names import check_backends, check_id, check_repo, check_repo_file
from rbee_tui.pools.client import PoolClient, PoolEvent, SampleReceived, StateChanged, WorkersListed
from rbee_tui.sample import Sample
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


FOLLOW_S = 1.0  # a pool's worker list is read again at most this often when its samples disagree with it


@dataclass(frozen=True)
class PoolStateChanged:
    """A pool connected, was lost or is reconnecting; `error` is the typed failure behind a lost pool."""

    pool: str
    state: str
    reason: str = ""
    error: RbeeError | None = None


@dataclass(frozen=True)
class SampleArrived:
    """A pool's metrics sample came in (read it from the pool's view)."""

    pool: str


@dataclass(frozen=True)
class WorkersChanged:
    """A pool's workers (or the ones being spawned there) changed."""

    pool: str


@dataclass(frozen=True)
class CatalogChanged:
    """A pool's catalog was read again."""

    pool: str


@dataclass(frozen=True)
class DownloadChanged:
    """A download made progress, finished, failed or was cancelled."""

    download: Download


@dataclass(frozen=True)
class ErrorReported:
    """Something failed that the user should hear about."""

    text: str


@dataclass(frozen=True)
class ClusterChanged:
    """A cluster of `model` started, changed state, failed, restarted or stopped."""

    model: str


@dataclass(frozen=True)
class NoticeReported:
    """Something the user should know that is not a failure (a cluster restarted on other nodes, say)."""

    text: str


@dataclass(frozen=True)
class MatrixChanged:
    """A job board cell changed (`key`), or the whole board (None)."""

    key: str | None


@dataclass(frozen=True)
class GatewayChanged:
    """The gateway started or stopped (its address and request rate are in `Fleet.gateway_status()`)."""

    url: str | None


FleetEvent = (
    PoolStateChanged
    | SampleArrived
    | WorkersChanged
    | CatalogChanged
    | DownloadChanged
    | ErrorReported
    | MatrixChanged
    | ClusterChanged
    | NoticeReported
    | GatewayChanged
)


class Fleet:
    """Owns a PoolClient per configured pool, and the work the dashboard starts on them."""

    def __init__(self, config: Config, on_event: Callable[[FleetEvent], None], **client_options: Any) -> None:
        self.config = config
        self.on_event = on_event
        self.client_options = client_options
        self.clients: dict[str, PoolClient] = {}
        self.catalogs: dict[str, dict[str, Any]] = {}
        self.downloads: dict[str, Download] = {}
        # Keyed by pool, worker id and start time: a new worker that reuses an id starts with no reading.
        self.last_tps: dict[tuple[str, str, float], float] = {}
        self.pending: dict[str, list[dict[str, Any]]] = {}
        self.matrix = MatrixBoard(
            lambda: self.clients,
            lambda: self.config.matrix,
            lambda key: self.on_event(MatrixChanged(key)),
            lambda text: self.on_event(ErrorReported(text)),
            save_concurrency=self.set_matrix_concurrency,
        )
        self.clusters = ClusterBoard(
            lambda: self.clients,
            lambda model: self.on_event(ClusterChanged(model)),
            lambda text: self.on_event(ErrorReported(text)),
            lambda text: self.on_event(NoticeReported(text)),
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._spawns: set[asyncio.Task[Any]] = set()
        self.gateway: Any = None  # the fleet's OpenAI endpoint (rbee_tui.gateway.service.Gateway) while it runs
        self._refreshing: set[str] = set()  # pools whose worker list is being read again
        self._followed: dict[str, float] = {}  # pool -> when its worker list may be read again
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
        """Turn a pool client's report into the dashboard's typed events."""
        match event:
            case StateChanged(pool=pool, state=state, reason=reason, error=error):
                self.on_event(PoolStateChanged(pool, state, reason, error))
                if state == "connected":
                    self._background(self._quietly(self.refresh_catalog(pool)))
            case SampleReceived(pool=pool, sample=sample):
                self.on_event(SampleArrived(pool))
                self._follow_workers(pool, sample)
            case WorkersListed(pool=pool):
                self.on_event(WorkersChanged(pool))

    def _follow_workers(self, pool: str, sample: Sample) -> None:
        """Workers started or stopped elsewhere (the CLI, another dashboard, a crash) show up in the node's
        samples before anyone tells us: read the list again when the sample's live workers are not the ones
        known (at most every FOLLOW_S per pool; a failure here is not the user's business, the next sample
        tries again)."""
        client = self.clients.get(pool)
        if client is None or pool in self._refreshing or time.monotonic() < self._followed.get(pool, 0.0):
            return
        seen = {r.id for r in sample.workers if r.alive}
        known = {w["id"] for w in client.view.workers if w["state"] != "exited"}
        if seen == known and {r.id for r in sample.workers} == {w["id"] for w in client.view.workers}:
            return
        self._refreshing.add(pool)
        self._followed[pool] = time.monotonic() + FOLLOW_S

        async def refresh() -> None:
            try:
                await client.workers()
            except RbeeError:
                pass
            finally:
                self._refreshing.discard(pool)

        self._background(refresh())

    async def _quietly(self, coro: Any) -> None:
        try:
            await coro
        except RbeeError as exc:
            self.on_event(ErrorReported(str(exc)))

    def start(self) -> None:
        """Connect every pool in the background."""
        for client in self.clients.values():
            client.start()

    def busy(self) -> list[str]:
        """What quitting now would cut short, in words (empty: nothing)."""
        out = [
            f"download of {d.model} on {d.pool}" for d in self.downloads.values() if d.state in ("starting", "running")
        ]
        if self.matrix.running:
            out.append("the matrix run")
        out += [f"the cluster of {m}" for m in self.clusters.clusters if self.clusters.running(m)]
        out += [f"spawn of {t.get_name().removeprefix('spawn:')}" for t in self._spawns if not t.done()]
        return out

    async def close(self) -> None:
        """Stop what this dashboard started, then close every connection: the matrix run and spawns in flight
        stop their workers first (a closed connection could not stop them any more), downloads keep their bytes."""
        downloads = [d.task for d in self.downloads.values() if d.task is not None and not d.task.done()]
        spawns = [t for t in self._spawns if not t.done()]
        for t in [*downloads, *spawns]:
            t.cancel()
        # Awaited, not only cancelled: a download's process on the node ends with its stream, which must close
        # while the connection is still there.
        await asyncio.wait(
            [
                asyncio.ensure_future(self.matrix.stop()),
                asyncio.ensure_future(self.clusters.close()),
                *downloads,
                *spawns,
            ],
            timeout=60,
        )
        if self.gateway is not None:  # its workers are stopped while the connections are still there
            await self.toggle_gateway()
        await asyncio.gather(*(c.close() for c in self.clients.values()), return_exceptions=True)

    def client(self, pool: str) -> PoolClient:
        """The client of `pool`."""
        if pool not in self.clients:
            raise RbeeError(f"no pool named {pool!r}")
        return self.clients[pool]

    def worker_room(self, pool: str) -> int | None:
        """What a new worker may use on `pool` now (its memory_budget or reserve, else available memory less a
        margin; rbee_tui/capacity.py), from its last sample or its status at connect; None when unknown."""
        from rbee_tui.capacity import free_for_workers, room_from_sample

        client = self.client(pool)
        cfg, view = client.pool, client.view
        if view.last_sample is not None:
            return room_from_sample(view.last_sample, cfg.memory_budget, cfg.reserve)
        available = view.status.get("ram_available")
        if not available:
            return None
        total = int(view.status.get("ram_total") or available)
        return free_for_workers(int(available), total, cfg.memory_budget, cfg.reserve, 0)

    # -- catalog ------------------------------------------------------------------------------------------

    async def refresh_catalog(self, pool: str) -> dict[str, Any]:
        """Fetch a pool's catalog and report it."""
        doc = await self.client(pool).hive("models", "catalog")
        self.catalogs[pool] = doc
        self.on_event(CatalogChanged(pool))
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
        self.on_event(DownloadChanged(d))
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
                self.on_event(DownloadChanged(d))
            if d.state not in ("done", "failed", "cancelled"):
                d.state, d.error = "failed", "the download ended without a result"
        except asyncio.CancelledError:
            d.state, d.error = "cancelled", "cancelled; the bytes received are kept for a resume"
        except RbeeError as exc:
            d.state, d.error = "failed", str(exc)
        self.on_event(DownloadChanged(d))
        if d.state == "failed":
            self.on_event(ErrorReported(f"download of {d.model} on {d.pool} failed: {d.error}"))
        with contextlib.suppress(RbeeError):
            await self.refresh_catalog(d.pool)

    def cancel_download(self, key: str) -> None:
        """Stop a download; its bytes stay on the node for the next attempt."""
        d = self.downloads.get(key)
        if d is not None and d.task is not None and not d.task.done():
            d.task.cancel()

    # -- workers ------------------------------------------------------------------------------------------

    async def spawn(self, pool: str, backend: str, model_id: str, gpu: int = 0) -> dict[str, Any]:
        """Spawn a worker and wait until it is ready (its loading shows in the workers list meanwhile). Quitting
        meanwhile stops the worker: nobody would be there to see it."""
        task = asyncio.ensure_future(self._spawn(pool, backend, model_id, gpu))
        task.set_name(f"spawn:{model_id} on {pool}")
        self._spawns.add(task)
        task.add_done_callback(self._spawns.discard)
        return await task

    async def _spawn(self, pool: str, backend: str, model_id: str, gpu: int) -> dict[str, Any]:
        client = self.client(pool)
        check_backends([backend])
        check_id(model_id)
        # Shown at once as "spawning", so the table answers the key before the node does.
        pending = {
            "id": f"spawning-{model_id}",
            "model": model_id,
            "backend": backend,
            "gpu": gpu if backend != "cpu" else "-",
            "port": "-",
            "state": "spawning",
            "started_at": time.time(),
            "engine": "-",
        }
        self.pending.setdefault(pool, []).append(pending)
        self.on_event(WorkersChanged(pool))

        def settled(worker: dict[str, Any] | None = None) -> None:
            # The node answered: the worker is in the pool's list now (loading), the placeholder goes.
            if pending in self.pending[pool]:
                self.pending[pool].remove(pending)
                self.on_event(WorkersChanged(pool))

        try:
            return await client.spawn_worker(backend, model_id, gpu=int(gpu), on_spawned=settled)
        finally:
            settled()

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
                        self.last_tps[(pool, worker_id, worker["started_at"])] = ev["tokens_per_sec"]
                    yield ev
            except (aiohttp.ClientError, RuntimeError) as exc:
                raise RbeeError(f"{worker_id}: {exc}") from None

    async def log_lines(self, pool: str, worker_id: str) -> AsyncIterator[str]:
        """A worker's log, then its new lines as they come."""
        async for ev in self.client(pool).hive_stream("worker", "logs", check_id(worker_id, "worker id"), "--follow"):
            if "line" in ev:
                yield ev["line"]

    # -- gateway ------------------------------------------------------------------------------------------

    async def toggle_gateway(self) -> str | None:
        """Start the gateway over these pools (its URL), or stop it and the workers it started (None)."""
        from rbee_tui.gateway.service import Gateway  # its server's imports only when it is used

        if self.gateway is not None:
            gateway, self.gateway = self.gateway, None
            await gateway.close()
            self.on_event(GatewayChanged(None))
            return None
        gateway = Gateway(
            lambda: self.clients,
            self.config.gateway,
            notify=self._gateway_event,
            follow_samples=False,  # this service layer already re-reads a pool's workers when they change
            clusters=lambda: self.clusters.clusters.values(),
        )
        url = await gateway.start()
        self.gateway = gateway
        self.on_event(GatewayChanged(url))
        return url

    def _gateway_event(self, event: Any) -> None:
        from rbee_tui.gateway.events import ClusterTrouble, StartFailed, WorkerLost, WorkerStarted, WorkerStopped

        match event:
            case StartFailed(reason=reason) | ClusterTrouble(text=reason):
                self.on_event(ErrorReported(f"gateway: {reason}"))
            case WorkerLost(cause=cause, retried=retried):
                self.on_event(NoticeReported(f"gateway: {cause}" + (" (retried elsewhere)" if retried else "")))
            case WorkerStarted() | WorkerStopped():
                self.on_event(GatewayChanged(self.gateway.url if self.gateway is not None else None))

    def gateway_status(self) -> str:
        """The gateway's address and request rate, for the status line ("" while it is off)."""
        if self.gateway is None:
            return ""
        return f"gateway {self.gateway.url}/v1  {self.gateway.rate():.1f} req/s"

    # -- config -------------------------------------------------------------------------------------------

    def save_pool_config(self, old_name: str | None, pool: PoolConfig) -> None:
        """Write a new pool (old_name None: refused if the name is taken) or a changed one into the config file,
        keeping every key and comment the form does not own (blocking: call it from a thread)."""
        if old_name is None:
            self.config = cfgmod.add_pool(self.config, pool)
        else:
            self.config = cfgmod.update_pool(self.config, old_name, pool)

    def connect_pool(self, old_name: str | None, pool: PoolConfig) -> None:
        """Connect to a saved pool, closing the connection of the entry it replaces. The entry as saved is used:
        it has the keys the form does not show (memory_budget, reserve, hive_command, ...)."""
        pool = next((p for p in self.config.pools if p.name == pool.name), pool)
        for name in {old_name, pool.name} - {None}:
            old = self.clients.pop(name, None)  # type: ignore[arg-type]
            if old is not None:
                self._background(old.close())
        self._add_client(pool).start()

    async def trust(self, pool: str, fingerprint: str) -> str:
        """Accept the host key the user saw (refused if the server now presents another); the pool then
        reconnects."""
        from rbee_tui.pools.hostkeys import trust

        return await trust(self.client(pool).pool, fingerprint)

    def set_theme(self, theme: str) -> None:
        """Remember the theme in the config file (blocking: call it from a thread)."""
        self.config = cfgmod.set_theme(self.config, theme)

    def set_matrix_concurrency(self, levels: tuple[int, ...]) -> None:
        """Save the job board's concurrency levels as `[matrix] concurrency`, keeping every other key and comment
        (empty: the key goes, no sweep); blocking: call it from a thread."""
        self.config = cfgmod.set_matrix_concurrency(self.config, levels)
