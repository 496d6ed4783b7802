"""The gateway's routing table: every live worker of every pool, by model, with its queue depth.

It learns workers from the pool clients' own events (WorkersListed after every `worker list`, StateChanged when a
pool is lost or back) and reads each worker's /health through its tunnel once a second, which says whether it
is ready and how many requests it holds. A request goes to the routable worker of its model with the smallest
queue depth: the requests the gateway has in flight to it now, plus the ones other clients had there at its
last /health.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from rbee_tui.errors import RbeeError
from rbee_tui.pools.client import CONNECTED, PoolClient, PoolEvent, SampleReceived, StateChanged, WorkersListed

POLL_S = 1.0  # how often each worker's /health is read
RELIST_S = 1.0  # a pool's worker list is read again at most this often when its samples disagree with it
HEALTH_TIMEOUT_S = 3.0
LIVE = ("ready", "busy")  # node states of a worker that answers requests

Key = tuple[str, str, float]  # pool, worker id, started_at: a new worker that reuses an id is another route


@dataclass(eq=False)
class Route:
    """One worker the gateway may send requests to, and what it knows of its load."""

    pool: str
    worker_id: str
    started_at: float
    model: str
    port: int
    engine: str
    kind: str
    ready: bool  # the node's list or the last /health said it answers
    worker: dict[str, Any]  # as the node listed it
    url: str | None = None  # where it answers from this machine (a tunnel for SSH pools)
    in_flight: int = 0  # requests the gateway is relaying to it now
    others: int = 0  # requests other clients had at the worker at its last /health
    served: int = 0
    broken: str = ""  # why the last request to it failed; it takes no request until a /health answers
    last_used: float = field(default_factory=time.monotonic)
    picked: int = 0  # pick order, so equally loaded workers take turns

    @property
    def key(self) -> Key:
        """pool, worker id, start time."""
        return (self.pool, self.worker_id, self.started_at)

    @property
    def depth(self) -> int:
        """Queue depth: ours in flight plus the others' at the last /health."""
        return self.in_flight + self.others

    @property
    def routable(self) -> bool:
        """Whether a request may go to it now."""
        return self.ready and not self.broken

    def describe(self) -> dict[str, Any]:
        """The route as /state shows it."""
        return {
            "pool": self.pool,
            "id": self.worker_id,
            "model": self.model,
            "engine": self.engine,
            "kind": self.kind,
            "state": self.worker.get("state"),
            "routable": self.routable,
            "broken": self.broken or None,
            "queue": self.depth,
            "in_flight": self.in_flight,
            "others": self.others,
            "served": self.served,
            "idle_s": round(time.monotonic() - self.last_used, 1) if not self.in_flight else 0.0,
        }


def _key(pool: str, worker: dict[str, Any]) -> Key:
    return (pool, str(worker["id"]), float(worker.get("started_at") or 0.0))


class RoutingTable:
    """Routes by model, kept in step with the pools; `start()` begins following them, `close()` ends it."""

    def __init__(
        self,
        clients: Callable[[], dict[str, PoolClient]],
        session: aiohttp.ClientSession,
        *,
        fronts: Callable[[], dict[tuple[str, str], str]] = dict,
        follow_samples: bool = True,
        poll_s: float = POLL_S,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._clients = clients
        self._session = session
        self._fronts = fronts  # (head pool, coordinator id) -> a cluster's front, which watches its requests
        self.follow_samples = follow_samples  # headless: nobody else re-reads a pool's list when workers change
        self.poll_s = poll_s
        self.on_change = on_change
        self.routes: dict[Key, Route] = {}
        self._attached: dict[str, PoolClient] = {}
        self._relisting: set[str] = set()
        self._relisted: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._turn = itertools.count(1)

    # -- following the pools -------------------------------------------------------------------------------

    def start(self) -> None:
        """Attach to every pool client and read each worker's /health from now on."""
        self.attach()
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll_loop(), name="gateway:health")

    async def close(self) -> None:
        """Stop following; detach from the clients."""
        tasks = [t for t in (self._poller, *self._tasks) if t is not None]
        self._poller = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for client in self._attached.values():
            with contextlib.suppress(ValueError):
                client.listeners.remove(self.hear)
        self._attached.clear()

    def attach(self) -> None:
        """Listen to clients not heard yet (the dashboard may add pools), forget the ones that went."""
        clients = self._clients()
        for name, client in list(self._attached.items()):
            if clients.get(name) is not client:
                with contextlib.suppress(ValueError):
                    client.listeners.remove(self.hear)
                del self._attached[name]
                self._drop_pool(name)
        for name, client in clients.items():
            if name in self._attached:
                continue
            client.listeners.append(self.hear)
            self._attached[name] = client
            if client.view.state == CONNECTED:
                self._sync(name, client.view.workers)
                self.relist(name)

    def hear(self, event: PoolEvent) -> None:
        """A pool client's event: the pool's routes follow it."""
        match event:
            case StateChanged(pool=pool, state=state):
                if state != CONNECTED:
                    self._drop_pool(pool)  # at once: no request waits on a pool that is gone
                # back: the client reads its workers itself on reconnect (WorkersListed follows)
            case WorkersListed(pool=pool, workers=workers):
                self._sync(pool, workers)
            case SampleReceived(pool=pool, sample=sample) if self.follow_samples:
                seen = {r.id for r in sample.workers if r.alive}
                known = {r.worker_id for r in self.routes.values() if r.pool == pool}
                if seen != known:
                    self.relist(pool)

    def _drop_pool(self, pool: str) -> None:
        gone = [k for k in self.routes if k[0] == pool]
        for k in gone:
            del self.routes[k]
        if gone:
            self.on_change()

    def _sync(self, pool: str, workers: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> None:
        """Make the pool's routes the workers the node just listed (exited ones leave)."""
        listed = {_key(pool, w): w for w in workers if w.get("state") != "exited"}
        changed = False
        for k in [k for k in self.routes if k[0] == pool and k not in listed]:
            del self.routes[k]
            changed = True
        for k, w in listed.items():
            route = self.routes.get(k)
            state = str(w.get("state"))
            if route is None:
                self.routes[k] = Route(
                    pool=pool,
                    worker_id=k[1],
                    started_at=k[2],
                    model=str(w.get("model")),
                    port=int(w.get("port") or 0),
                    engine=str(w.get("engine") or ""),
                    kind=str(w.get("kind") or "worker"),
                    ready=state in LIVE,
                    worker=dict(w),
                )
                changed = True
            else:
                route.worker = dict(w)
                if state in LIVE or state == "loading":
                    route.ready = state in LIVE
        if changed:
            self.on_change()

    def relist(self, pool: str) -> None:
        """Read the pool's worker list again in the background (at most every RELIST_S)."""
        client = self._attached.get(pool)
        if client is None or pool in self._relisting or client.view.state != CONNECTED:
            return
        if time.monotonic() < self._relisted.get(pool, 0.0):
            return
        self._relisting.add(pool)
        self._relisted[pool] = time.monotonic() + RELIST_S

        async def run() -> None:
            try:
                await client.workers()  # WorkersListed brings the answer here
            except RbeeError:
                pass  # a pool that does not answer is lost soon, and its routes with it
            finally:
                self._relisting.discard(pool)

        self._background(run())

    def _background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reading each worker's /health ---------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while True:
            self.attach()
            routes = list(self.routes.values())
            if routes:
                await asyncio.gather(*(self._poll(r) for r in routes), return_exceptions=True)
            await asyncio.sleep(self.poll_s)

    async def _poll(self, route: Route) -> None:
        try:
            url = await self.url(route)
        except RbeeError:
            return
        try:
            timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
            async with self._session.get(f"{url}/health", timeout=timeout) as resp:
                body = await resp.json(content_type=None) if resp.status in (200, 503) else {}
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            if route.key in self.routes and not route.broken:
                route.broken = f"no answer from its /health ({type(exc).__name__})"
                self.on_change()
                self.relist(route.pool)  # gone, most likely: the node says how it ended
            return
        if route.key not in self.routes:
            return
        was = route.routable
        route.ready = status == 200
        if status == 200:
            route.broken = ""
            queue = int(body.get("queue") or 0) if isinstance(body, dict) else 0
            route.others = max(0, queue - route.in_flight)
        if route.routable != was:
            self.on_change()

    # -- routing -------------------------------------------------------------------------------------------

    async def url(self, route: Route) -> str:
        """Where the route answers from this machine: a cluster's front, the worker's port, or a tunnel to it."""
        front = self._fronts().get((route.pool, route.worker_id))
        if front is not None:
            return front
        if route.url is None:
            client = self._attached.get(route.pool)
            if client is None:
                raise RbeeError(f"pool {route.pool} is gone")
            route.url = await client.worker_url(route.worker)
        return route.url

    def candidates(self, model: str, exclude: set[Key] | frozenset[Key] = frozenset()) -> list[Route]:
        """The routable workers of `model`, least loaded first (equal ones in turn)."""
        found = [r for r in self.routes.values() if r.model == model and r.routable and r.key not in exclude]
        return sorted(found, key=lambda r: (r.depth, r.picked))

    def loading(self, model: str, exclude: set[Key] | frozenset[Key] = frozenset()) -> bool:
        """Whether a worker of `model` is loading (it will take requests soon)."""
        return any(
            r.model == model and not r.ready and not r.broken and r.key not in exclude for r in self.routes.values()
        )

    def pick(self, model: str, exclude: set[Key] | frozenset[Key] = frozenset()) -> Route | None:
        """Lease the worker the next request of `model` goes to (None: no worker of it is up); `release` it after.

        The lease counts at once, before any await: the idle stopper never stops a worker a request just took.
        """
        found = self.candidates(model, exclude)
        if not found:
            return None
        route = found[0]
        route.picked = next(self._turn)
        route.in_flight += 1
        return route

    def release(self, route: Route) -> None:
        """The request leased with `pick` is over."""
        route.in_flight -= 1
        route.served += 1
        route.last_used = time.monotonic()

    def models(self) -> dict[str, list[Route]]:
        """Every model with a live worker, and its workers."""
        out: dict[str, list[Route]] = {}
        for r in self.routes.values():
            out.setdefault(r.model, []).append(r)
        return out

    def mark_broken(self, route: Route, why: str) -> None:
        """A request to the route failed: no request goes there until its /health answers again."""
        route.broken = why
        self.on_change()
        self.relist(route.pool)
