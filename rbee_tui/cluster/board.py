"""The dashboard's clusters: plan, spawn, watch and stop models split over pools. No UI imports.

The dashboard process holds the SSH relays of the clusters it started, so it is also their watcher (as
`rbee-tui cluster spawn` is for a headless one): quitting stops them, coordinator first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from rbee_tui.cluster.planner import Placement
from rbee_tui.cluster.runtime import Cluster
from rbee_tui.errors import RbeeError
from rbee_tui.names import check_id
from rbee_tui.pools.client import PoolClient


class ClusterBoard:
    """Clusters this dashboard started, by model."""

    def __init__(
        self,
        clients: Callable[[], dict[str, PoolClient]],
        on_change: Callable[[str], None],
        on_error: Callable[[str], None],
        on_notice: Callable[[str], None] = lambda text: None,
    ) -> None:
        self._clients = clients
        self._on_change = on_change
        self._on_error = on_error
        self._on_notice = on_notice
        self.clusters: dict[str, Cluster] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping: dict[str, asyncio.Event] = {}

    def _cluster(self, model: str, pools: list[str], ctx: int, spread: bool) -> Cluster:
        return Cluster(
            self._clients(),
            check_id(model),
            pools,
            ctx=ctx,
            policy="spread" if spread else "fewest",
            on_event=lambda doc: self._event(model, doc),
        )

    def _event(self, model: str, doc: dict[str, Any]) -> None:
        if doc.get("event") in ("failed", "restart_refused", "restart_failed"):
            self._on_error(f"cluster {model}: {doc['event'].replace('_', ' ')}: {doc.get('reason', '')}")
        elif doc.get("event") == "restarted":  # what the watcher did, in its words
            self._on_notice(f"cluster {model}: {doc.get('reason', 'restarted')}")
        self._on_change(model)

    async def plan(self, model: str, pools: list[str], ctx: int = 2048, spread: bool = False) -> Placement:
        """What spawning would place where (or a Refusal with the numbers)."""
        return await self._cluster(model, pools, ctx, spread).plan()

    def running(self, model: str) -> bool:
        """Whether this dashboard watches a cluster of `model`."""
        task = self._tasks.get(model)
        return task is not None and not task.done()

    def spawn(self, model: str, pools: list[str], ctx: int = 2048, spread: bool = False) -> Cluster:
        """Start a cluster in the background; it is watched until stopped (one restart on a failure)."""
        if self.running(model):
            raise RbeeError(f"a cluster of {model} is running", "stop it first (k in the Clusters pane)")
        cluster = self._cluster(model, pools, ctx, spread)
        self.clusters[model] = cluster
        stopping = self._stopping[model] = asyncio.Event()
        self._tasks[model] = asyncio.create_task(self._run(model, cluster, stopping), name=f"cluster:{model}")
        self._on_change(model)
        return cluster

    async def _run(self, model: str, cluster: Cluster, stopping: asyncio.Event) -> None:
        try:
            await cluster.spawn()
            self._on_change(model)
            await cluster.watch(stopping)
        except RbeeError as exc:
            cluster.state, cluster.reason = "failed", str(exc)
            self._on_error(f"cluster {model}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(cluster.stop())
            if cluster.state not in ("failed",):
                cluster.state = "stopped"
            self._on_change(model)

    async def stop(self, model: str) -> None:
        """Stop a cluster: coordinator, then RPC servers, then relays."""
        task = self._tasks.get(model)
        if task is None or task.done():
            return
        if model in self._stopping:
            self._stopping[model].set()
        if self.clusters[model].state != "ready":  # still starting: cut it short, what started is stopped
            task.cancel()
        await asyncio.wait({task}, timeout=60)

    async def close(self) -> None:
        """Stop every cluster (before the pool connections close)."""
        await asyncio.gather(*(self.stop(m) for m in list(self._tasks)), return_exceptions=True)

    def describe(self, model: str) -> dict[str, Any]:
        """A cluster's nodes, layer ranges, shares, memory and port."""
        return self.clusters[model].describe()
