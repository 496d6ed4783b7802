"""Runs a matrix: pools in parallel, one job at a time inside a pool; each job downloads if needed, spawns,
waits for ready, runs the test prompt twice, verifies, and always stops its worker. Every step is stored."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from rbee_tui.errors import RbeeError
from rbee_tui.matrix.plan import MEMORY_MARGIN, Cell
from rbee_tui.matrix.store import Store
from rbee_tui.pools.client import CONNECTED, PoolClient, PoolEvent, PoolUnreachable
from rbee_tui.worker.client import execute

TEST_PROMPT = "Hello, how are you?"


class PoolLost(Exception):
    """The pool went away during a job."""


class MatrixRunner:
    """Runs cells against connected pool clients and records everything in a Store."""

    def __init__(
        self,
        clients: dict[str, PoolClient],
        store: Store,
        *,
        max_tokens: int = 16,
        seed: int = 42,
        on_change: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.clients = clients
        self.store = store
        self.max_tokens = max_tokens
        self.seed = seed
        self.on_change = on_change or (lambda job: None)
        self.tasks: list[asyncio.Task[None]] = []
        self.cancelled = False

    def _update(self, run_id: int, job_id: int, state: str, reason: str = "", log_tail: str = "", **m: Any) -> None:
        self.store.set_state(job_id, state, reason, log_tail, **m)
        self.on_change({"run_id": run_id, "job_id": job_id, "state": state, "reason": reason, **m})

    async def run(self, cells: list[Cell], settings: dict[str, Any] | None = None, run_id: int | None = None) -> int:
        """Run `cells` (a new run, or again inside `run_id` for retries); returns the run id."""
        self.cancelled = False
        if run_id is None:
            run_id = self.store.new_run(settings or {})
        jobs = [(cell, self.store.add_job(run_id, cell)) for cell in cells]
        for cell, job_id in jobs:
            self.on_change(
                {
                    "run_id": run_id,
                    "job_id": job_id,
                    "cell": cell.key,
                    "state": "skipped" if cell.skip else "queued",
                    "reason": cell.skip,
                }
            )
        by_pool: dict[str, list[tuple[Cell, int]]] = {}
        for cell, job_id in jobs:
            if not cell.skip:
                by_pool.setdefault(cell.pool, []).append((cell, job_id))
        self.tasks = [
            asyncio.create_task(self._pool(run_id, pool, todo), name=f"matrix:{pool}") for pool, todo in by_pool.items()
        ]
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r
        self.store.finish_run(run_id, "cancelled" if self.cancelled else "finished")
        return run_id

    def cancel(self) -> None:
        """Stop the run: running jobs stop their workers, queued ones are marked cancelled."""
        self.cancelled = True
        for task in self.tasks:
            task.cancel()

    async def _pool(self, run_id: int, pool: str, todo: list[tuple[Cell, int]]) -> None:
        client = self.clients[pool]
        lost = ""
        for i, (cell, job_id) in enumerate(todo):
            if lost or client.view.state != CONNECTED:
                lost = lost or client.view.reason or client.view.state
                self._update(run_id, job_id, "pool lost", lost)
                continue
            try:
                await self._job(run_id, client, cell, job_id)
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

        def watch(event: PoolEvent) -> None:
            if event.kind != "sample":
                return
            s = event.data
            temps = [t for t in [s["temps"].get("cpu_c"), *s["temps"].get("gpus_c", [])] if t is not None]
            if temps:
                peaks["peak_temp_c"] = max(peaks["peak_temp_c"] or 0, *temps)
            for row in s.get("workers", []):
                if worker_id and row["id"] == worker_id[0]:
                    peaks["peak_rss"] = max(peaks["peak_rss"], row.get("rss_bytes") or 0)
                    peaks["peak_vram"] = max(peaks["peak_vram"], row.get("vram_bytes") or 0)

        client.listeners.append(watch)
        measured: dict[str, Any] = {}
        try:
            entry = await self._checked(client, client.hive("models", "catalog"))
            model = next((m for m in entry["models"] if m["id"] == cell.model), None)
            if model is None:
                self._update(run_id, job_id, "skipped", f"{cell.model} not registered on {cell.pool}")
                return
            measured.update(model_size=model["size_bytes"], model_type=model["architecture"])
            sample = client.view.last_sample
            if sample and cell.backend == "cpu" and model["size_bytes"] * MEMORY_MARGIN > sample["ram"]["available"]:
                self._update(run_id, job_id, "skipped", "not enough free memory on the pool now", **measured)
                return
            t0 = time.monotonic()
            if not model["downloaded"]:
                self._update(run_id, job_id, "downloading", **measured)
                final: dict[str, Any] = {}
                async for ev in client.hive_stream("models", "download", cell.model):
                    final = ev
                if final.get("event") != "done":
                    raise RbeeError(f"download failed: {final.get('error', 'no result')}")
            measured["download_s"] = round(time.monotonic() - t0, 3)
            self._update(run_id, job_id, "spawning", **measured)
            t1 = time.monotonic()
            w = await self._checked(client, self._spawn(client, cell, worker_id))
            self._update(run_id, job_id, "loading", **measured)
            w = await self._checked(client, client.wait_worker_ready(w["id"], timeout=600))
            measured["load_s"] = round(time.monotonic() - t1, 3)
            url = await client.worker_url(w)
            self._update(run_id, job_id, "running", **measured)
            first, health = await self._generate(url, w["engine"])
            if health.get("model") not in (None, cell.model):
                raise RbeeError(f"another worker ({health.get('model')}) answers on port {w['port']}")
            second, _ = await self._generate(url, w["engine"])
            self._update(run_id, job_id, "verifying", **measured)
            measured.update(
                ttft_ms=first["ttft_ms"],
                pp_avg_ts=first["prompt_tokens_per_sec"],
                avg_ts=first["tokens_per_sec"],
                n_prompt=first["prompt_tokens"],
                n_gen=first["tokens_generated"],
                n_gpu_layers=0 if cell.backend == "cpu" else 99,
                build_commit=f"{w['engine']} {health.get('engine_version', '')}".strip(),
            )
            if first["tokens_generated"] <= 0:
                raise RbeeError("no tokens were generated")
            if first["text"] != second["text"]:
                raise RbeeError("the same seed gave different text on the second run")
            # One reading at the end too, so a job shorter than a sampling interval still has its memory.
            for row in await client.workers():
                if row["id"] == worker_id[0] and row.get("rss_bytes"):
                    peaks["peak_rss"] = max(peaks["peak_rss"], row["rss_bytes"])
            measured.update({k: v for k, v in peaks.items() if v})
            self._update(run_id, job_id, "passed", **measured)
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

    async def _spawn(self, client: PoolClient, cell: Cell, worker_id: list[str]) -> dict[str, Any]:
        """Spawn the cell's worker and note its id, even when the run is cancelled meanwhile: a spawn cut short
        could leave a worker that nobody knows to stop, so a cancellation waits for the spawn's answer."""
        spawn = asyncio.ensure_future(
            client.hive("worker", "spawn", cell.backend, "--model", cell.model, "--gpu", str(cell.gpu), "--json")
        )
        try:
            w = await asyncio.shield(spawn)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                worker_id.append((await spawn)["id"])  # the caller's clean-up stops it
            raise
        worker_id.append(w["id"])
        return w

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

    async def _generate(self, url: str, engine: str) -> tuple[dict[str, Any], dict[str, Any]]:
        import aiohttp

        body = {"prompt": TEST_PROMPT, "max_tokens": self.max_tokens, "temperature": 0.7, "seed": self.seed}
        async with aiohttp.ClientSession() as session:
            try:
                async with session.get(f"{url}/health") as resp:
                    health = await resp.json()
                async for ev in execute(session, url, engine, body):
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
