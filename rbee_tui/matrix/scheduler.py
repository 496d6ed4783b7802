"""Runs a matrix: pools in parallel, one job at a time inside a pool; each job downloads if needed, spawns,
waits for ready, runs the test prompt twice, verifies, and always stops its worker. A cluster column (a model
split over pools with llama.cpp RPC) runs its cells one at a time, each while no other cell runs on any of its
pools. Every step is stored, through one writer thread: the loop that runs the jobs (the dashboard's) never
waits on the database."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rbee_tui.capacity import MemoryWatch, WontFit, refusal
from rbee_tui.cluster.meter import Counts
from rbee_tui.cluster.planner import Refusal
from rbee_tui.cluster.runtime import Cluster
from rbee_tui.config import DEFAULT_CLUSTER_CTX
from rbee_tui.errors import RbeeError
from rbee_tui.matrix.plan import Cell
from rbee_tui.matrix.store import Store, StoreWriter, default_path
from rbee_tui.matrix.sweep import spawn_args, split_backend, sweep, worker_parallel
from rbee_tui.pools.client import CONNECTED, PoolClient, PoolEvent, PoolUnreachable, SampleReceived
from rbee_tui.worker.client import execute

TEST_PROMPT = "Hello, how are you?"


class PoolLost(Exception):
    """The pool went away during a job."""


class MatrixRunner:
    """Runs cells against connected pool clients and records everything in a results database."""

    def __init__(
        self,
        clients: dict[str, PoolClient],
        store: Store | Path | None = None,
        *,
        max_tokens: int = 16,
        seed: int = 42,
        cluster_ctx: int = DEFAULT_CLUSTER_CTX,
        on_change: Callable[[dict[str, Any]], None] | None = None,
        concurrency: tuple[int, ...] = (),
    ) -> None:
        self.clients = clients
        self.path = store.path if isinstance(store, Store) else Path(store or default_path())
        self._store = store if isinstance(store, Store) else None
        self.writer: StoreWriter | None = None
        self.max_tokens = max_tokens
        self.seed = seed
        self.cluster_ctx = cluster_ctx
        self.concurrency = tuple(sorted(set(concurrency)))  # a plain cell's sweep levels (matrix/sweep.py)
        self.locks: dict[str, asyncio.Lock] = {}  # one job at a time on a pool, whether its own or a cluster's
        self.on_change = on_change or (lambda job: None)
        self.tasks: list[asyncio.Task[None]] = []
        self.cancelled = False

    @property
    def store(self) -> Store:
        """The results database for reading (blocking: for scripts and tests; the runner itself writes through
        its writer thread)."""
        if self._store is None:
            self._store = Store(self.path)
        return self._store

    def _update(self, run_id: int, job_id: int, state: str, reason: str = "", log_tail: str = "", **m: Any) -> None:
        # Queued for the writer; the listener hears of it now, in order (the board shows it live from here).
        assert self.writer is not None
        self.writer.set_state(job_id, state, reason, log_tail, **m)
        self.on_change({"run_id": run_id, "job_id": job_id, "state": state, "reason": reason, **m})

    async def run(self, cells: list[Cell], settings: dict[str, Any] | None = None, run_id: int | None = None) -> int:
        """Run `cells` (a new run, or again inside `run_id` for retries); returns the run id once every result
        is stored."""
        self.cancelled = False
        self.writer = writer = StoreWriter(self.path)
        try:
            return await self._run(writer, cells, settings, run_id)
        finally:
            writer.close()  # what is still queued (after a failure) is written all the same

    async def _run(
        self, writer: StoreWriter, cells: list[Cell], settings: dict[str, Any] | None, run_id: int | None
    ) -> int:
        if run_id is None:
            run_id = int(await writer.call(Store.new_run, settings or {}))
        else:
            writer.submit(Store.reopen_run, run_id)
        jobs = list(zip(cells, await writer.call(Store.add_jobs, run_id, cells), strict=True))
        for cell, job_id in jobs:
            self.on_change(
                {
                    "run_id": run_id,
                    "job_id": job_id,
                    "cell": cell.key,
                    "state": cell.initial_state,
                    "reason": cell.skip,
                }
            )
        by_pool: dict[str, list[tuple[Cell, int]]] = {}  # a pool's cells, or a cluster column's
        for cell, job_id in jobs:
            if not cell.skip:
                by_pool.setdefault(cell.column if cell.is_cluster else cell.pool, []).append((cell, job_id))
        self.locks = {p: asyncio.Lock() for cell, _ in jobs for p in cell.members}
        self.tasks = [
            asyncio.create_task(self._pool(run_id, pool, todo), name=f"matrix:{pool}") for pool, todo in by_pool.items()
        ]
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r
        writer.submit(Store.finish_run, run_id, "cancelled" if self.cancelled else "finished")
        await writer.flush()
        return run_id

    def cancel(self) -> None:
        """Stop the run: running jobs stop their workers, queued ones are marked cancelled."""
        self.cancelled = True
        for task in self.tasks:
            task.cancel()

    def _lost(self, members: tuple[str, ...]) -> str:
        """Why one of these pools is not connected ('' when all are)."""
        for name in members:
            view = self.clients[name].view
            if view.state != CONNECTED:
                reason = view.reason or view.state
                return reason if len(members) == 1 else f"{name}: {reason}"
        return ""

    async def _pool(self, run_id: int, pool: str, todo: list[tuple[Cell, int]]) -> None:
        """The cells of one pool (or of one cluster column), one at a time."""
        lost = ""
        for i, (cell, job_id) in enumerate(todo):
            if lost or self._lost(cell.members):
                lost = lost or self._lost(cell.members)
                self._update(run_id, job_id, "pool lost", lost)
                continue
            try:
                async with contextlib.AsyncExitStack() as held:
                    # Sorted: a pool's task and the cluster columns over it take the same locks in the same
                    # order, so none waits on another forever.
                    for name in sorted(cell.members):
                        await held.enter_async_context(self.locks[name])
                    if cell.is_cluster:
                        await self._cluster_job(run_id, cell, job_id)
                    else:
                        await self._job(run_id, self.clients[cell.pool], cell, job_id)
            except asyncio.CancelledError:
                self._update(run_id, job_id, "cancelled", "the run was cancelled")
                for _, rest in todo[i + 1 :]:
                    self._update(run_id, rest, "cancelled", "the run was cancelled")
                raise
            except PoolLost as exc:
                lost = str(exc)
                self._update(run_id, job_id, "pool lost", lost)

    async def _job(self, run_id: int, client: PoolClient, cell: Cell, job_id: int) -> None:
        peaks = {"peak_rss": 0, "peak_vram": 0, "peak_temp_c": None}
        worker_id: list[str] = []
        memory = MemoryWatch()  # the node's RAM and swap over the cell, for predicted against measured

        def watch(event: PoolEvent) -> None:
            if not isinstance(event, SampleReceived):
                return
            s = event.sample
            memory.observe(s)
            if s.temps:
                peaks["peak_temp_c"] = max(peaks["peak_temp_c"] or 0, *s.temps)
            row = s.worker(worker_id[0]) if worker_id else None
            if row is not None:
                peaks["peak_rss"] = max(peaks["peak_rss"], row.rss_bytes or 0)
                peaks["peak_vram"] = max(peaks["peak_vram"], row.vram_bytes or 0)

        client.listeners.append(watch)
        measured: dict[str, Any] = {}
        try:
            model = await self._model(run_id, job_id, client, cell, measured)
            if model is None:
                return
            sample = client.view.last_sample
            # A column may name its engine (cpu/llama-server): that worker gets a slot per stream of the sweep.
            backend, engine = split_backend(cell.backend)
            pool = client.pool
            refused = refusal(
                model.get("memory"), sample, pool.memory_budget, pool.reserve, pool.name, backend, cell.gpu, cell.model
            )
            if refused is not None:  # the memory model says it would not fit: nothing is started
                measured.update(needed_bytes=refused.needed_bytes, free_bytes=refused.free_bytes)
                self._update(run_id, job_id, "skipped", refused.message, **measured)
                return
            if sample is not None:
                memory.observe(sample)  # the node before the worker
            await self._download(run_id, job_id, client, cell, model, measured)
            self._update(run_id, job_id, "spawning", **measured)
            t1 = time.monotonic()

            def spawned(w: dict[str, Any]) -> None:
                worker_id.append(w["id"])
                self._update(run_id, job_id, "loading", **measured)

            extra = spawn_args(engine, self.concurrency)
            spawn = client.spawn_worker(backend, cell.model, *extra, gpu=cell.gpu, timeout=600, on_spawned=spawned)
            try:
                w = await self._checked(client, spawn)
            except WontFit as exc:  # the node's own check, from its own readings: nothing was started
                measured.update(needed_bytes=exc.needed_bytes, free_bytes=exc.free_bytes)
                self._update(run_id, job_id, "skipped", exc.message, **measured)
                return
            measured["load_s"] = round(time.monotonic() - t1, 3)
            rss_loaded = w.get("rss_bytes")
            url = w["client_url"]
            self._update(run_id, job_id, "running", **measured)
            first, health = await self._generate(url, w["engine"])
            if health.get("model") not in (None, cell.model):
                raise RbeeError(f"another worker ({health.get('model')}) answers on port {w['port']}")
            second, _ = await self._generate(url, w["engine"])
            self._update(run_id, job_id, "verifying", **measured)
            n_gpu_layers = 0 if backend == "cpu" else 99
            build = f"{w['engine']} {health.get('engine_version', '')}"
            _record_runs(measured, first, second, n_gpu_layers, build)
            if self.concurrency:
                await self._sweep(run_id, job_id, url, w["engine"], measured)
            await _last_rss(client, worker_id[0], peaks)
            measured.update({k: v for k, v in peaks.items() if v})
            if client.view.last_sample is not None:
                memory.observe(client.view.last_sample)
            measured.update(
                memory.measurements(model.get("memory"), rss_loaded, peaks["peak_rss"], peaks["peak_vram"], backend)
            )
            # The log of a passed job is kept too: its details show how the worker loaded.
            self._update(run_id, job_id, "passed", "", await self._log_tail(client, worker_id[0]), **measured)
        except RbeeError as exc:
            if isinstance(exc, PoolUnreachable) or not await self._reachable(client):
                raise PoolLost(client.view.reason or str(exc)) from None
            tail = await self._log_tail(client, worker_id[0]) if worker_id else ""
            measured.update({k: v for k, v in peaks.items() if v})
            self._update(run_id, job_id, "failed", str(exc).splitlines()[0], tail, **measured)
        finally:
            client.listeners.remove(watch)
            if worker_id:
                with contextlib.suppress(Exception):
                    await asyncio.shield(client.stop_worker(worker_id[0]))

    async def _sweep(self, run_id: int, job_id: int, url: str, engine: str, measured: dict[str, Any]) -> None:
        """The cell's concurrency sweep (matrix/sweep.py), each level stored as soon as it is measured."""

        def level_done(levels: list[dict[str, Any]]) -> None:
            measured["concurrency"] = levels
            self._update(run_id, job_id, "running", f"concurrency {levels[-1]['level']} measured", **measured)

        await sweep(
            url,
            engine,
            self.concurrency,
            parallel=worker_parallel(engine, self.concurrency),
            prompt=TEST_PROMPT,
            max_tokens=self.max_tokens,
            seed=self.seed,
            on_level=level_done,
        )

    async def _model(
        self, run_id: int, job_id: int, client: PoolClient, cell: Cell, measured: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The model's catalog entry on `client`'s pool (None, the cell skipped, when it is not registered)."""
        entry = await self._checked(client, client.hive("models", "catalog"))
        model = next((m for m in entry["models"] if m["id"] == cell.model), None)
        if model is None:
            self._update(run_id, job_id, "skipped", f"{cell.model} not registered on {client.pool.name}")
            return None
        measured.update(model_size=model["size_bytes"], model_type=model["architecture"])
        return model

    async def _download(
        self,
        run_id: int,
        job_id: int,
        client: PoolClient,
        cell: Cell,
        model: dict[str, Any],
        measured: dict[str, Any],
    ) -> None:
        """Download the model on `client`'s pool unless it is there; its time goes in `download_s`."""
        t0 = time.monotonic()
        if not model["downloaded"]:
            self._update(run_id, job_id, "downloading", **measured)
            final: dict[str, Any] = {}
            async for ev in client.hive_stream("models", "download", cell.model):
                final = ev
            if final.get("event") != "done":
                raise RbeeError(f"download failed: {final.get('error', 'no result')}")
        measured["download_s"] = round(time.monotonic() - t0, 3)

    async def _cluster_job(self, run_id: int, cell: Cell, job_id: int) -> None:
        """A model split over the cell's pools: plan (a refusal skips the cell with its numbers), spawn, measure
        like any cell plus each node's memory and the bytes its RPC link moved, stop everything."""
        members = cell.members
        head = self.clients[members[0]]
        nodes = {p: {"pool": p, "ram_used_start": None, "peak_ram_used": 0} for p in members}
        peaks: dict[str, Any] = {"peak_rss": 0, "peak_temp_c": None}
        coordinator: list[str] = []

        def watcher(pool: str) -> Callable[[PoolEvent], None]:
            def watch(event: PoolEvent) -> None:
                if not isinstance(event, SampleReceived):
                    return
                s, node = event.sample, nodes[pool]
                if node["ram_used_start"] is None:
                    node["ram_used_start"] = s.ram.used
                node["peak_ram_used"] = max(node["peak_ram_used"], s.ram.used)
                if s.temps:
                    peaks["peak_temp_c"] = max(peaks["peak_temp_c"] or 0, *s.temps)
                row = s.worker(coordinator[0]) if coordinator and pool == members[0] else None
                if row is not None:
                    peaks["peak_rss"] = max(peaks["peak_rss"], row.rss_bytes or 0)

            return watch

        listeners = {p: watcher(p) for p in members}
        for p, fn in listeners.items():
            self.clients[p].listeners.append(fn)
        cluster = Cluster(
            {p: self.clients[p] for p in members},
            cell.model,
            list(members),
            ctx=self.cluster_ctx,
            policy="spread",  # a cluster column is the model over every pool it names
            restarts=0,  # a matrix measures: a restart on fewer nodes would be another cell
            meter=True,
        )
        measured: dict[str, Any] = {}
        try:
            model = await self._model(run_id, job_id, head, cell, measured)
            if model is None:
                return
            await self._download(run_id, job_id, head, cell, model, measured)
            self._update(run_id, job_id, "spawning", **measured)
            t1 = time.monotonic()
            survey = await cluster.survey()
            try:
                placement = cluster.place(survey)
            except Refusal as exc:
                measured.update(needed_bytes=exc.needed_bytes, free_bytes=exc.free_bytes)
                self._update(run_id, job_id, "skipped", str(exc), **measured)
                return
            self._update(run_id, job_id, "loading", **measured)
            ready = await cluster.start(placement, survey)
            coordinator.append(ready["coordinator"]["id"])
            measured["load_s"] = round(time.monotonic() - t1, 3)
            at_load = self._bytes(cluster)
            self._update(run_id, job_id, "running", **measured)
            marks: list[dict[str, Counts]] = [self._bytes(cluster)]
            first, _ = await self._generate(
                ready["url"], "llama-server", on_token=lambda: marks.append(self._bytes(cluster))
            )
            marks.append(self._bytes(cluster))
            second, _ = await self._generate(ready["url"], "llama-server")
            self._update(run_id, job_id, "verifying", **measured)
            build = f"llama-server {cluster.head_info.get('build', '')}"
            _record_runs(measured, first, second, placement.n_layer + 1, build)
            await _last_rss(head, coordinator[0], peaks)
            await asyncio.gather(*(_last_ram(self.clients[p], nodes[p]) for p in members))
            # prefill: from the request to the first token; decode: from the first token to the end
            start, first_token, end = marks[0], marks[1] if len(marks) > 2 else marks[-1], marks[-1]
            per_node = self._nodes(cluster, nodes, at_load, start, first_token, end)
            measured.update({k: v for k, v in peaks.items() if v}, nodes=per_node)
            for key in ("net_load_bytes", "net_prefill_bytes", "net_decode_bytes"):
                known = [n[key] for n in per_node if n[key] is not None]
                measured[key] = sum(known) if known else None
            tail = await self._log_tail(head, coordinator[0])
            self._update(run_id, job_id, "passed", "", tail, **measured)
        except RbeeError as exc:
            lost = self._lost(members)
            if lost or isinstance(exc, PoolUnreachable):
                raise PoolLost(lost or str(exc)) from None
            tail = await self._log_tail(head, coordinator[0]) if coordinator else ""
            measured.update({k: v for k, v in peaks.items() if v})
            self._update(run_id, job_id, "failed", str(exc).splitlines()[0], tail, **measured)
        finally:
            for p, fn in listeners.items():
                self.clients[p].listeners.remove(fn)
            with contextlib.suppress(Exception):
                await asyncio.shield(cluster.stop())

    @staticmethod
    def _bytes(cluster: Cluster) -> dict[str, Counts]:
        return {name: meter.snapshot() for name, meter in cluster.meters.items()}

    @staticmethod
    def _nodes(
        cluster: Cluster,
        samples: dict[str, dict[str, Any]],
        at_load: dict[str, Counts],
        start: dict[str, Counts],
        first_token: dict[str, Counts],
        end: dict[str, Counts],
    ) -> list[dict[str, Any]]:
        """Each node's share, memory (planned, and as its pool's samples saw it) and RPC bytes by phase."""
        out = []
        for node in cluster.describe().get("nodes", []):
            name = node["pool"]
            seen = samples.get(name, {})
            row: dict[str, Any] = {
                "pool": name,
                "layers": node["layers"],
                "share": node["share"],
                "planned_bytes": node["memory_bytes"],
                "peak_ram_used": seen.get("peak_ram_used") or None,
                "ram_used_start": seen.get("ram_used_start"),
            }
            if name in cluster.meters:
                row["link"] = "ssh relay"
                row["net_load_bytes"] = at_load[name].total
                row["net_prefill_bytes"] = first_token[name].since(start[name]).total
                row["net_decode_bytes"] = end[name].since(first_token[name]).total
            else:
                # The head's own rpc-server is on its loopback (nothing crosses a network); a pool with
                # rpc_host is dialled directly by the head, past this machine, so its bytes are not counted.
                on_head = name == cluster.head
                row["link"] = "loopback on the head" if on_head else "lan (not counted)"
                for key in ("net_load_bytes", "net_prefill_bytes", "net_decode_bytes"):
                    row[key] = 0 if on_head else None
            out.append(row)
        return out

    async def _reachable(self, client: PoolClient) -> bool:
        """Ask the pool once more before blaming the model: a failure may be the link dying under the job."""
        if client.view.state != CONNECTED:
            return False
        try:
            await client.hive("version", timeout=15)
        except PoolUnreachable:
            return False
        except RbeeError:
            return True
        return True

    async def _checked(self, client: PoolClient, coro: Any) -> Any:
        try:
            return await coro
        except RbeeError as exc:
            if isinstance(exc, PoolUnreachable) or client.view.state != CONNECTED:
                raise PoolLost(client.view.reason or str(exc)) from None
            raise

    async def _generate(
        self, url: str, engine: str, on_token: Callable[[], None] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        import aiohttp

        tokens = 0
        body = {"prompt": TEST_PROMPT, "max_tokens": self.max_tokens, "temperature": 0.7, "seed": self.seed}
        async with aiohttp.ClientSession() as session:
            try:
                async with session.get(f"{url}/health") as resp:
                    health = await resp.json()
                async for ev in execute(session, url, engine, body):
                    if ev["event"] == "token" and on_token is not None and not tokens:
                        on_token()  # the first token: prefill is over
                    tokens += ev["event"] == "token"
                    if ev["event"] == "done":
                        return ev, health
            except (aiohttp.ClientError, RuntimeError) as exc:
                raise RbeeError(f"inference failed: {exc}") from None
        raise RbeeError("inference ended without a summary")

    async def _log_tail(self, client: PoolClient, worker_id: str) -> str:
        with contextlib.suppress(Exception):
            doc = await client.hive("worker", "logs", worker_id, "--lines", "10")
            return "\n".join(doc.get("lines", []))
        return ""


def _record_runs(
    measured: dict[str, Any], first: dict[str, Any], second: dict[str, Any], n_gpu_layers: int, build: str
) -> None:
    """Record the first run's measurements (kept even when the cell fails), then check both runs: tokens came,
    and the same seed gave the same text."""
    measured.update(
        ttft_ms=first["ttft_ms"],
        pp_avg_ts=first["prompt_tokens_per_sec"],
        avg_ts=first["tokens_per_sec"],
        n_prompt=first["prompt_tokens"],
        n_gen=first["tokens_generated"],
        n_gpu_layers=n_gpu_layers,
        build_commit=build.strip(),
    )
    if first["tokens_generated"] <= 0:
        raise RbeeError("no tokens were generated")
    if first["text"] != second["text"]:
        raise RbeeError("the same seed gave different text on the second run")


async def _last_ram(client: PoolClient, node: dict[str, Any]) -> None:
    """A node's RAM in use now, so a cell shorter than a sampling interval still has each node's memory."""
    with contextlib.suppress(RbeeError, TimeoutError):
        async with asyncio.timeout(10):
            status = await client.hive("status")
        node["peak_ram_used"] = max(node["peak_ram_used"], int(status["ram_total"]) - int(status["ram_available"]))


async def _last_rss(client: PoolClient, worker_id: str, peaks: dict[str, Any]) -> None:
    """One reading at the end too, so a job shorter than a sampling interval still has its memory."""
    for row in await client.workers():
        if row["id"] == worker_id and row.get("rss_bytes"):
            peaks["peak_rss"] = max(peaks["peak_rss"], row["rss_bytes"])
