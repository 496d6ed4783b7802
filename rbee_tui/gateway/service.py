"""The gateway as a service: owns its HTTP server, the routing table, workers on demand and the catalogs.

It runs over pool clients someone else owns and connects (the headless command's, or the dashboard's Fleet),
so the dashboard and the gateway share one connection per pool. No UI imports here.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web

from rbee_tui.cluster.runtime import Cluster
from rbee_tui.config import GatewayConfig
from rbee_tui.errors import RbeeError
from rbee_tui.gateway.auth import api_key, check_exposure, parse_listen
from rbee_tui.gateway.events import GatewayEvent, Listening
from rbee_tui.gateway.ondemand import OnDemand
from rbee_tui.gateway.routes import Route, RoutingTable
from rbee_tui.gateway.server import build_app
from rbee_tui.pools.client import CONNECTED, PoolClient

RATE_WINDOW_S = 10.0  # requests per second are counted over this window
CATALOG_MAX_AGE_S = 10.0
CATALOG_TIMEOUT_S = 10.0
EXPLAIN_TRIES = 5  # a dead worker's exit is on the node's books within moments: look a few times


def fronts_of(clusters: Iterable[Cluster]) -> dict[tuple[str, str], str]:
    """(head pool, coordinator id) -> the front port of each ready cluster (it watches every request it relays)."""
    out = {}
    for c in clusters:
        run = c.running
        if c.state == "ready" and run is not None and run.coordinator is not None and c.front is not None:
            out[(c.head, str(run.coordinator["id"]))] = f"http://127.0.0.1:{c.front.port}"
    return out


class Gateway:
    """One OpenAI endpoint for every pool's workers. `start()` listens; `close()` stops the server, then the
    workers and clusters it started (the ones it found running are left as they are)."""

    table: RoutingTable
    ondemand: OnDemand
    session: aiohttp.ClientSession

    def __init__(
        self,
        clients: Callable[[], dict[str, PoolClient]],
        config: GatewayConfig,
        *,
        listen: str | None = None,
        notify: Callable[[GatewayEvent], None] = lambda event: None,
        follow_samples: bool = True,
        clusters: Callable[[], Iterable[Cluster]] = list,
    ) -> None:
        self.clients = clients
        self.config = config
        self.host, self.port = parse_listen(listen or config.listen)
        self.key = api_key(config.api_key)
        check_exposure(self.host, self.key)  # before anything listens
        self.notify = notify
        self.follow_samples = follow_samples
        self._other_clusters = clusters  # the dashboard's own clusters: routed to as well
        self._runner: web.AppRunner | None = None
        self.started = 0.0
        self.requests = 0
        self._recent: deque[float] = deque()
        self._catalogs: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        """The gateway's base URL (OpenAI clients take this + /v1)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether it listens."""
        return self._runner is not None

    async def start(self) -> str:
        """Listen, follow the pools, and start stopping idle workers; the base URL."""
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),  # as many requests in flight as clients send
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),  # a generation takes as long as it takes
            auto_decompress=False,
        )
        self.table = RoutingTable(self.clients, self.session, fronts=self._fronts, follow_samples=self.follow_samples)
        self.ondemand = OnDemand(self.clients, self.table, self.config, self.notify)
        runner = web.AppRunner(
            build_app(self, self.key, self.config.max_body),
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,  # a client that leaves cancels its relay, which cancels its job
            shutdown_timeout=5.0,  # stopping the gateway cuts streams short after this, rather than wait them out
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            await self.session.close()
            raise RbeeError(f"the gateway cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        server = site._server
        if self.port == 0 and server is not None:
            self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        self._runner = runner
        self.started = time.time()
        self.table.start()
        self.ondemand.start()
        self.notify(Listening(self.url))
        return self.url

    async def close(self) -> None:
        """Stop listening (requests in flight end), then stop what the gateway started."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        await runner.cleanup()
        await self.ondemand.close()
        await self.table.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await self.session.close()

    def background(self, coro: Any) -> None:
        """Run `coro` on its own (a job's cancel after its client left)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fronts(self) -> dict[tuple[str, str], str]:
        return fronts_of([*self.ondemand.board.clusters.values(), *self._other_clusters()])

    # -- numbers -------------------------------------------------------------------------------------------

    def count_request(self) -> None:
        """A completion request came in."""
        now = time.monotonic()
        self.requests += 1
        self._recent.append(now)
        while self._recent and self._recent[0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def rate(self) -> float:
        """Completion requests per second over the last RATE_WINDOW_S."""
        now = time.monotonic()
        while self._recent and self._recent[0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        # A gateway up for 3 s that served 30 requests did 10 a second, not 3.
        span = min(RATE_WINDOW_S, max(time.time() - self.started, 1.0)) if self.started else RATE_WINDOW_S
        return len(self._recent) / span

    def uptime(self) -> float:
        """Seconds since it started listening."""
        return round(time.time() - self.started, 1) if self.started else 0.0

    def in_flight(self) -> int:
        """Requests being relayed now."""
        return sum(r.in_flight for r in self.table.routes.values())

    # -- models --------------------------------------------------------------------------------------------

    async def _catalog(self, name: str, client: PoolClient) -> None:
        try:
            async with asyncio.timeout(CATALOG_TIMEOUT_S):
                doc = await client.hive("models", "catalog")
        except (RbeeError, TimeoutError):
            self._catalogs.pop(name, None)  # unknown now; the workers up there still route
            return
        self._catalogs[name] = (time.monotonic(), list(doc.get("models", [])))

    async def refresh_catalogs(self, max_age: float = CATALOG_MAX_AGE_S) -> None:
        """Read the catalogs of connected pools not read within `max_age` seconds."""
        now = time.monotonic()
        clients = self.clients()
        for name in [n for n in self._catalogs if clients.get(n) is None or clients[n].view.state != CONNECTED]:
            del self._catalogs[name]
        stale = [
            (n, c)
            for n, c in clients.items()
            if c.view.state == CONNECTED and now - self._catalogs.get(n, (-1e9, []))[0] > max_age
        ]
        if stale:
            await asyncio.gather(*(self._catalog(n, c) for n, c in stale))

    def model_ids(self) -> set[str]:
        """Models with a worker up, or registered on a connected pool."""
        ids = {r.model for r in self.table.routes.values()}
        return ids | {m["id"] for _, models in self._catalogs.values() for m in models}

    async def known(self, model: str) -> bool:
        """Whether a request may name `model` (the catalogs are read again when it is not known yet)."""
        if model in self.model_ids():
            return True
        await self.refresh_catalogs(max_age=1.0)
        return model in self.model_ids()

    async def model_list(self) -> dict[str, dict[str, Any]]:
        """Every model a request may name: where it is downloaded, and its workers up now."""
        await self.refresh_catalogs()
        out: dict[str, dict[str, Any]] = {}
        for pool, (_, models) in sorted(self._catalogs.items()):
            for m in models:
                info = out.setdefault(m["id"], {"created": self.started, "downloaded_on": [], "workers": []})
                if m.get("downloaded"):
                    info["downloaded_on"].append(pool)
        for r in self.table.routes.values():
            info = out.setdefault(r.model, {"created": self.started, "downloaded_on": [], "workers": []})
            info["workers"].append(f"{r.worker_id}@{r.pool}")
            info["created"] = min(info["created"], r.started_at or info["created"])
        return out

    # -- failures ------------------------------------------------------------------------------------------

    async def explain(self, route: Route, cause: str) -> str:
        """Why a request to `route` failed, in words: the node's account of the worker when it has one."""
        where = f"worker {route.worker_id} ({route.model}) on pool {route.pool}"
        client = self.clients().get(route.pool)
        if client is None or client.view.state != CONNECTED:
            state = client.view.state if client is not None else "gone"
            reason = client.view.reason if client is not None else ""
            return f"{where}: the pool is {state}" + (f" ({reason})" if reason else "") + f"; {cause}"
        if cause.startswith("it answered 503"):
            return f"{where}: {cause}"
        for _ in range(EXPLAIN_TRIES):
            try:
                async with asyncio.timeout(5):
                    workers = await client.workers()
            except (RbeeError, TimeoutError) as exc:
                return f"{where}: its pool does not answer ({exc or 'timed out'}); {cause}"
            me = next(
                (w for w in workers if (w["id"], w.get("started_at")) == (route.worker_id, route.started_at)), None
            )
            if me is None:
                return f"{where} was stopped; {cause}"
            if me.get("state") == "exited":
                return f"{where} ended: {me.get('reason') or 'no reason given'}"
            await asyncio.sleep(0.2)
        return f"{where}: {cause}"

    # -- /state --------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Pools, workers, cluster placements and queues, as GET /state answers."""
        clients = self.clients()
        owned = set(self.ondemand.owned)
        pools = []
        for name, c in clients.items():
            sample = c.view.last_sample
            pools.append(
                {
                    "name": name,
                    "transport": c.pool.transport,
                    "state": c.view.state,
                    "reason": c.view.reason or None,
                    "backends": list(c.pool.backends),
                    "ram_available": sample.ram.available if sample else c.view.status.get("ram_available"),
                    "workers": sum(r.pool == name for r in self.table.routes.values()),
                }
            )
        workers = [{**r.describe(), "started_by_gateway": r.key in owned} for r in self.table.routes.values()]
        ours = set(self.ondemand.board.clusters.values())
        clusters = []
        for c in [*ours, *self._other_clusters()]:
            doc = c.describe()
            clusters.append(
                {
                    "model": doc["model"],
                    "head": doc["head"],
                    "state": doc["state"],
                    "reason": doc.get("reason") or None,
                    "url": doc.get("url"),
                    "started_by_gateway": c in ours,
                    "nodes": [
                        {k: n[k] for k in ("pool", "layers", "output", "share", "memory_bytes")}
                        for n in doc.get("nodes", [])
                    ],
                }
            )
        queues: dict[str, dict[str, int]] = {}
        for model, routes in self.table.models().items():
            queues[model] = {
                "workers": sum(r.routable for r in routes),
                "in_flight": sum(r.in_flight for r in routes),
                "queued_at_workers": sum(r.depth for r in routes),
                "waiting_for_start": 0,
            }
        for model, n in self.ondemand.waiting.items():
            queues.setdefault(model, {"workers": 0, "in_flight": 0, "queued_at_workers": 0})["waiting_for_start"] = n
        return {
            "gateway": {
                "url": self.url,
                "auth": self.key is not None,
                "uptime_s": self.uptime(),
                "requests": self.requests,
                "requests_per_s": round(self.rate(), 2),
                "in_flight": self.in_flight(),
                "idle_stop_s": self.config.idle_stop,
                "start_timeout_s": self.config.start_timeout,
                "max_body": self.config.max_body,
            },
            "pools": pools,
            "workers": workers,
            "clusters": clusters,
            "queues": queues,
            "starts": [s.describe() for s in self.ondemand.starts.values()],
        }
