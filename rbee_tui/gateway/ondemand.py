"""Workers on demand: a request for a model with no worker up starts one, and an idle one is stopped again.

Where: the node decides what fits (a spawn whose predicted memory exceeds the pool's free memory is refused
with the numbers), so the gateway keeps no memory model of its own. It asks every connected pool that has the
model downloaded, tries them in order (a pool with a GPU backend first, then the most free memory), and takes a
refusal as "not here". When no single pool takes it, the model is split over the connected pools with llama.cpp
RPC (cluster/runtime.py, whose planner refuses with needed vs free). Every refusal goes into the 503 the
request gets when nothing could start. One start per model at a time: requests that arrive meanwhile wait on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rbee_tui.capacity import WontFit
from rbee_tui.cluster.board import ClusterBoard
from rbee_tui.config import DEFAULT_CLUSTER_CTX, GatewayConfig
from rbee_tui.errors import RbeeError
from rbee_tui.gateway.events import ClusterTrouble, GatewayEvent, StartFailed, WorkerStarted, WorkerStopped
from rbee_tui.gateway.routes import Key, Route, RoutingTable
from rbee_tui.pools.client import CONNECTED, PoolClient

GPU_BACKENDS = ("cuda", "metal")
SURVEY_TIMEOUT_S = 20.0
SETTLE_S = 2.0  # a worker that was just started ready may take a poll to show as routable
LOADING_POLL_S = 0.1


class NoWorker(RbeeError):
    """No worker of a model is up and none could be started in time: the text of the gateway's 503."""


@dataclass
class Start:
    """One attempt at starting a worker of `model`, shared by every request that waits for it."""

    model: str
    task: asyncio.Task[str] | None = None
    began: float = field(default_factory=time.time)
    trying: str = ""  # the pool (or cluster) being tried now
    outcome: str = ""  # where it started, or why it could not

    @property
    def done(self) -> bool:
        """Whether the attempt is over, started or not."""
        return self.task is None or self.task.done()

    def describe(self) -> dict[str, Any]:
        """The start as /state shows it."""
        task = self.task
        failed = task is not None and task.done() and (task.cancelled() or task.exception() is not None)
        state = "starting" if not self.done else "failed" if failed else "ready"
        return {"model": self.model, "state": state, "trying": self.trying or None, "outcome": self.outcome or None}


@dataclass(frozen=True)
class Candidate:
    """A pool that holds the model downloaded, with the backend it would run it on and its free memory."""

    pool: str
    client: PoolClient
    backend: str
    gpu: int
    ram_available: int


def _prefixed(pool: str, exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if text.startswith(f"pool {pool}") else f"pool {pool}: {text}"


def backend_for(configured: tuple[str, ...] | list[str], status: dict[str, Any], model: dict[str, Any]) -> str:
    """The backend to run `model` on: a GPU one that the pool's config, the node and the model all have, else cpu."""
    offered = [b for b in configured if b in (status.get("backends") or ["cpu"])]
    wanted = model.get("backends") or ["cpu"]
    usable = [b for b in offered if b in wanted]
    for b in GPU_BACKENDS:
        if b in usable:
            return b
    return "cpu"


def in_order(candidates: list[Candidate]) -> list[Candidate]:
    """The order pools are tried in: a GPU backend first, then the most free memory."""
    return sorted(candidates, key=lambda c: (c.backend not in GPU_BACKENDS, -c.ram_available))


def _gpu(client: PoolClient) -> int:
    """The GPU with the most free memory in the pool's last sample (0 when it did not say)."""
    sample = client.view.last_sample
    gpus = [(g.memory_free or 0, g.index) for g in sample.gpus] if sample is not None else []
    return max(gpus)[1] if gpus else 0


class OnDemand:
    """Starts workers for requests that find none, and stops the ones it started once idle."""

    def __init__(
        self,
        clients: Callable[[], dict[str, PoolClient]],
        table: RoutingTable,
        config: GatewayConfig,
        notify: Callable[[GatewayEvent], None],
    ) -> None:
        self._clients = clients
        self.table = table
        self.config = config
        self.notify = notify
        self.owned: dict[Key, str] = {}  # workers this gateway started -> their model
        self.starts: dict[str, Start] = {}  # the current (or last) start of each model
        self.waiting: Counter[str] = Counter()  # requests waiting for a start, by model
        self._cluster_changed: dict[str, asyncio.Event] = {}
        self.board = ClusterBoard(
            clients,
            self._on_cluster,
            lambda text: notify(ClusterTrouble(text)),
            lambda text: notify(ClusterTrouble(text)),
        )
        self._idle: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin stopping idle workers (every few seconds)."""
        if self._idle is None and self.config.idle_stop > 0:
            self._idle = asyncio.create_task(self._idle_loop(), name="gateway:idle")

    # -- waiting for a worker ------------------------------------------------------------------------------

    async def route(self, model: str, exclude: set[Key] | frozenset[Key] = frozenset()) -> Route:
        """Lease a worker of `model`, starting one when none is up; NoWorker (the 503) when none can be had."""
        route = self.table.pick(model, exclude)
        if route is not None:
            return route
        timeout = self.config.start_timeout
        deadline = time.monotonic() + timeout
        self.waiting[model] += 1
        try:
            # A worker of it that is loading (started from the dashboard, say) is waited for, not doubled.
            while self.table.loading(model, exclude) and time.monotonic() < deadline:
                await asyncio.sleep(LOADING_POLL_S)
                if (route := self.table.pick(model, exclude)) is not None:
                    return route
            start = self.starts.get(model)
            if start is None or start.done:
                start = self._begin(model)
            task = start.task
            assert task is not None
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                where = f" (still starting on {start.trying})" if start.trying else ""
                raise NoWorker(f"no worker of {model} was ready within {timeout:g} s{where}")
            if task.cancelled():
                raise NoWorker(f"the start of {model} was cancelled")
            if (exc := task.exception()) is not None:
                raise NoWorker(str(exc)) from None
            settle = time.monotonic() + SETTLE_S
            while (route := self.table.pick(model, exclude)) is None and time.monotonic() < settle:
                await asyncio.sleep(0.05)
            if route is None:
                raise NoWorker(f"the worker of {model} started {start.outcome} does not answer")
            return route
        finally:
            self.waiting[model] -= 1
            if not self.waiting[model]:
                del self.waiting[model]

    def _begin(self, model: str) -> Start:
        start = Start(model)
        start.task = asyncio.create_task(self._start(model, start), name=f"gateway:start:{model}")
        # Retrieved here too: every request waiting on it may have timed out before it failed.
        start.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.starts[model] = start
        return start

    # -- starting ------------------------------------------------------------------------------------------

    async def _survey(self, name: str, client: PoolClient, model: str) -> Candidate | str:
        """The pool as a candidate for `model`, or why it is not one."""
        try:
            async with asyncio.timeout(SURVEY_TIMEOUT_S):
                status, catalog = await asyncio.gather(client.hive("status"), client.hive("models", "catalog"))
        except (RbeeError, TimeoutError) as exc:
            return _prefixed(name, exc) if str(exc) else f"pool {name}: no answer"
        entry = next((m for m in catalog.get("models", []) if m.get("id") == model), None)
        if entry is None:
            return f"pool {name}: {model} is not in its catalog"
        if not entry.get("downloaded"):
            return f"pool {name}: {model} is not downloaded there"
        backend = backend_for(client.pool.backends, status, entry)
        return Candidate(name, client, backend, _gpu(client), int(status.get("ram_available") or 0))

    async def candidates(self, model: str) -> tuple[list[Candidate], list[str]]:
        """Connected pools that hold `model`, in the order they are tried, and why the others are not tried."""
        clients = {n: c for n, c in self._clients().items() if c.view.state == CONNECTED}
        found = await asyncio.gather(*(self._survey(n, c, model) for n, c in clients.items()))
        usable = [c for c in found if isinstance(c, Candidate)]
        return in_order(usable), [c for c in found if isinstance(c, str)]

    async def _start(self, model: str, start: Start) -> str:
        t0 = time.monotonic()
        connected = [n for n, c in self._clients().items() if c.view.state == CONNECTED]
        try:
            if not connected:
                raise NoWorker(f"cannot start {model}: no pool is connected")
            usable, reasons = await self.candidates(model)
            too_big = False  # a pool refused for memory: a split over several may hold it
            for cand in usable:
                start.trying = cand.pool
                spawned: list[dict[str, Any]] = []
                try:
                    w = await cand.client.spawn_worker(
                        cand.backend, model, gpu=cand.gpu, timeout=self.config.start_timeout, on_spawned=spawned.append
                    )
                except RbeeError as exc:  # refused (does not fit, or cannot run there): the next pool
                    reasons.append(_prefixed(cand.pool, exc))
                    too_big = too_big or isinstance(exc, WontFit)
                    for left in spawned:  # started, then failed to get ready in time: nobody would stop it
                        with contextlib.suppress(RbeeError):
                            await cand.client.stop_worker(str(left["id"]))
                    continue
                self.owned[(cand.pool, str(w["id"]), float(w.get("started_at") or 0.0))] = model
                start.outcome = f"{w['id']} on {cand.pool}"
                self.notify(WorkerStarted(model, start.outcome, round(time.monotonic() - t0, 2)))
                return start.outcome
            if too_big and len(connected) > 1:
                head = usable[0].pool
                pools = [head, *(n for n in connected if n != head)]
                start.trying = f"a cluster over {', '.join(pools)}"
                try:
                    await self._cluster(model, pools)
                except RbeeError as exc:
                    reasons.append(f"split over {', '.join(pools)}: {exc}")
                else:
                    start.outcome = start.trying
                    self.notify(WorkerStarted(model, start.outcome, round(time.monotonic() - t0, 2)))
                    return start.outcome
            elif too_big:
                reasons.append("no split over several pools: only one pool is connected")
            raise NoWorker(f"cannot start {model}: " + "; ".join(reasons or ["no pool holds it"]))
        except NoWorker as exc:
            start.outcome = exc.message
            self.notify(StartFailed(model, exc.message))
            raise
        finally:
            start.trying = ""

    def _on_cluster(self, model: str) -> None:
        event = self._cluster_changed.get(model)
        if event is not None:
            event.set()

    async def _cluster(self, model: str, pools: list[str]) -> None:
        """Split `model` over `pools` (as few as fit) and wait until its coordinator is ready."""
        changed = self._cluster_changed.setdefault(model, asyncio.Event())
        cluster = self.board.spawn(model, pools, ctx=DEFAULT_CLUSTER_CTX)
        try:
            while True:
                changed.clear()
                if cluster.state == "ready":
                    return
                if not self.board.running(model):
                    raise RbeeError(cluster.reason or f"the cluster {cluster.state}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await changed.wait()
        except asyncio.CancelledError:
            await asyncio.shield(self.board.stop(model))
            raise

    # -- idle stop -----------------------------------------------------------------------------------------

    async def _idle_loop(self) -> None:
        tick = min(max(self.config.idle_stop / 4, 0.2), 5.0)
        while True:
            await asyncio.sleep(tick)
            with contextlib.suppress(RbeeError):
                await self.stop_idle()

    def _gone(self, key: Key) -> bool:
        """Whether an owned worker is known to be gone (stopped elsewhere, or dead): its pool listed it no more."""
        client = self._clients().get(key[0])
        if client is None:
            return True
        if client.view.state != CONNECTED:
            return False  # unknown until the pool is back
        return not any(
            w["id"] == key[1] and float(w.get("started_at") or 0.0) == key[2] and w.get("state") != "exited"
            for w in client.view.workers
        )

    async def stop_idle(self) -> None:
        """Stop the workers (and clusters) this gateway started that nobody used for idle_stop seconds."""
        now = time.monotonic()
        limit = self.config.idle_stop
        for key, model in list(self.owned.items()):
            route = self.table.routes.get(key)
            if route is None:
                if self._gone(key):
                    del self.owned[key]
                continue
            if route.in_flight or now - route.last_used < limit:
                continue
            del self.owned[key]
            self.table.mark_broken(route, "stopping: idle")  # no request takes it from now on
            await self._stop_worker(key, model, f"idle for {limit:g} s")
        for model, cluster in list(self.board.clusters.items()):
            run = cluster.running
            if not self.board.running(model) or run is None or run.coordinator is None:
                continue
            coordinator = (cluster.head, str(run.coordinator["id"]))
            route = next((r for r in self.table.routes.values() if (r.pool, r.worker_id) == coordinator), None)
            if route is None or route.in_flight or now - route.last_used < limit:
                continue
            self.table.mark_broken(route, "stopping: idle")
            await self.board.stop(model)
            self.notify(WorkerStopped(model, f"a cluster over {', '.join(cluster.pools)}", f"idle for {limit:g} s"))

    async def _stop_worker(self, key: Key, model: str, why: str) -> None:
        client = self._clients().get(key[0])
        if client is None:
            return
        try:
            await client.stop_worker(key[1])
        except RbeeError as exc:
            self.notify(StartFailed(model, f"could not stop {key[1]} on {key[0]}: {exc}"))
            return
        self.notify(WorkerStopped(model, f"{key[1]} on {key[0]}", why))

    async def close(self) -> None:
        """Cancel starts in progress and stop every worker and cluster this gateway started."""
        tasks = [s.task for s in self.starts.values() if s.task is not None and not s.task.done()]
        if self._idle is not None:
            tasks.append(self._idle)
            self._idle = None
        for t in tasks:
            t.cancel()  # a cancelled spawn stops what the node started (PoolClient.spawn_worker)
        if tasks:
            await asyncio.wait(tasks, timeout=60)
        owned, self.owned = dict(self.owned), {}
        await asyncio.gather(
            *(self._stop_worker(k, m, "the gateway stopped") for k, m in owned.items()),
            self.board.close(),
            return_exceptions=True,
        )
