"""Packing a pool: how many of these models fit at once, and how fast they are together.

Each model is first measured alone (one worker, its tokens/s). Then workers start in the order given, as many
as the node takes: the memory model predicts how many fit the pool's budget, and the node itself refuses the
first spawn that would not fit (WontFit), before starting anything. Every started worker then generates at the
same time while the node's memory, swap, temperatures and clocks are watched (a clock that drops under load is
throttling). Everything started is stopped at the end, whatever happened, and the node is asked to confirm that
nothing is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rbee_tui.errors import RbeeError
from rbee_tui.pools.client import PoolClient, PoolEvent, SampleReceived
from rbee_tui.sample import Sample
from rbee_tui.worker.client import execute

PROMPT = "Hello, how are you?"


def predicted_bytes(entry: dict[str, Any]) -> int:
    """A catalog entry's predicted memory for one worker (the node's memory model, `memory.total`)."""
    memory = entry.get("memory") or {}
    if not memory.get("total"):
        raise RbeeError(
            f"the catalog of this pool gives no memory prediction for {entry['id']}",
            "update rbee-tui on the node: `rbee-hive models catalog --json` gives each model's `memory`",
        )
    return int(memory["total"])


def count_fitting(predictions: list[int], budget: int) -> int:
    """How many of the workers, started in this order, fit `budget`: the first that does not fit ends it."""
    used = 0
    for n, need in enumerate(predictions):
        if used + need > budget:
            return n
        used += need
    return len(predictions)


@dataclass
class Watch:
    """What the node's samples showed during the load: peaks, lowest clocks, swap traffic."""

    ram_used_peak: int = 0
    swap_used_peak: int = 0
    swap_io_start: int | None = None
    swap_io_end: int | None = None
    temps_peak_c: float | None = None
    cpu_freq_min: float | None = None
    gpu_clock_min: dict[str, float] = field(default_factory=dict)
    rss_peak: dict[str, int] = field(default_factory=dict)

    def add(self, s: Sample) -> None:
        """Fold one sample in."""
        self.ram_used_peak = max(self.ram_used_peak, s.ram.used)
        self.swap_used_peak = max(self.swap_used_peak, s.swap.used)
        if s.swap.sin is not None and s.swap.sout is not None:
            io = s.swap.sin + s.swap.sout
            self.swap_io_start = io if self.swap_io_start is None else min(self.swap_io_start, io)
            self.swap_io_end = io if self.swap_io_end is None else max(self.swap_io_end, io)
        if s.temps:
            self.temps_peak_c = max(self.temps_peak_c or 0.0, *s.temps)
        if s.cpu_freq_mhz:
            self.cpu_freq_min = min(self.cpu_freq_min or s.cpu_freq_mhz, s.cpu_freq_mhz)
        for g in s.gpus:
            if g.clock_sm_mhz:
                key = str(g.index)
                self.gpu_clock_min[key] = min(self.gpu_clock_min.get(key, g.clock_sm_mhz), g.clock_sm_mhz)
        for w in s.workers:
            if w.rss_bytes:
                self.rss_peak[w.id] = max(self.rss_peak.get(w.id, 0), w.rss_bytes)


class Packer:
    """Packs one pool with `models` (in the order they start) and returns the packing result."""

    def __init__(
        self,
        client: PoolClient,
        models: list[str],
        *,
        backend: str | None = None,
        max_tokens: int = 16,
        seconds: float = 0.0,
        seed: int = 42,
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        if not models:
            raise RbeeError("packing needs at least one model")
        self.client = client
        self.models = list(models)
        self.backend = backend or client.pool.backends[0]
        self.max_tokens = max_tokens
        self.seconds = seconds
        self.seed = seed
        self.note = on_note or (lambda line: None)
        self.started: list[dict[str, Any]] = []  # the workers of this packing still to stop
        self._task: asyncio.Task[dict[str, Any]] | None = None

    def cancel(self) -> None:
        """Stop the packing: every worker it started is stopped."""
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> dict[str, Any]:
        """Measure alone, pack, load together, stop everything; the packing result."""
        self._task = asyncio.ensure_future(self._run())
        try:
            return await self._task
        finally:
            await asyncio.shield(self._stop_all())

    async def _run(self) -> dict[str, Any]:
        pool = self.client.pool.name
        entries = await self._entries()
        predictions = [predicted_bytes(entries[m]) for m in self.models]
        budget = await self._budget()
        predicted = count_fitting(predictions, budget)
        self.note(f"budget {budget / 1e9:.2f} GB for workers on {pool}: {predicted} of {len(self.models)} predicted")
        idle = await self._reading()
        alone: dict[str, float | None] = {}
        for model in dict.fromkeys(self.models):
            alone[model] = speed = await self._alone(model)
            self.note(f"alone: {model} " + (f"{speed:.1f} tok/s" if speed else "does not fit even alone"))
        refused = ""
        watch = Watch()
        if idle is not None and idle.swap.sin is not None and idle.swap.sout is not None:
            watch.swap_io_start = idle.swap.sin + idle.swap.sout  # swap traffic from before the first spawn
        steps: list[dict[str, Any]] = []
        listen = self._listener(watch)
        self.client.listeners.append(listen)
        try:
            for i, (model, need) in enumerate(zip(self.models, predictions, strict=True)):
                try:
                    w = await self.client.spawn_worker(self.backend, model, timeout=600, on_spawned=self.started.append)
                except RbeeError as exc:
                    if _wont_fit(exc):
                        refused = str(exc)
                        self.note(f"refused: {refused}")
                        break
                    raise
                w["predicted_bytes"] = need
                self.started[-1] = w
                await self._load(w, self.seed + i, once=True)  # warm-up: its first request reads the weights' pages in
                # Every worker started so far at once: the slowdown against the number of co-resident models.
                together = await self._together(watch)
                steps.append(
                    {
                        "count": len(self.started),
                        "workers": [
                            {"model": s["model"], "worker": s["id"], "together_tps": round(together[s["id"]], 2)}
                            for s in self.started
                        ],
                    }
                )
                self.note(f"{len(self.started)} together: " + ", ".join(f"{t:.1f}" for t in together.values()))
        finally:
            self.client.listeners.remove(listen)
        if not self.started:
            raise RbeeError(f"no worker fits on {pool}: {refused}")
        await self._last_readings(watch)
        workers = [
            {
                "model": w["model"],
                "worker": w["id"],
                "alone_tps": round(alone[w["model"]] or 0.0, 2),
                "together_tps": next(s["together_tps"] for s in steps[-1]["workers"] if s["worker"] == w["id"]),
                "rss_bytes": watch.rss_peak.get(w["id"], 0),
                "predicted_bytes": w["predicted_bytes"],
            }
            for w in self.started
        ]
        left = await self._stop_all()
        if left:
            raise RbeeError(f"worker(s) {', '.join(left)} still on {pool} after stopping", "rbee-hive worker list")
        io = None
        if watch.swap_io_start is not None and watch.swap_io_end is not None:
            io = watch.swap_io_end - watch.swap_io_start
        idle_gpu = {str(g.index): g.clock_sm_mhz for g in idle.gpus if g.clock_sm_mhz} if idle else {}
        return {
            "pool": pool,
            "models": self.models,
            "budget_bytes": budget,
            "predicted_count": predicted,
            "started": len(workers),
            "refused": refused,
            "workers": workers,
            "ram_used_peak": watch.ram_used_peak,
            "swap_used_peak": watch.swap_used_peak,
            "swap_in_out_bytes": io,
            "temps_peak_c": watch.temps_peak_c,
            "cpu_freq_mhz": (
                {"idle": idle.cpu_freq_mhz, "min_load": watch.cpu_freq_min}
                if idle and idle.cpu_freq_mhz and watch.cpu_freq_min
                else None
            ),
            "gpu_clock_mhz": {
                gpu: {"idle": idle_gpu[gpu], "min_load": low}
                for gpu, low in watch.gpu_clock_min.items()
                if gpu in idle_gpu
            }
            or None,
            "steps": steps,
            "backend": self.backend,
            "max_tokens": self.max_tokens,
            "seconds": self.seconds,
            "finished_at": time.time(),
        }

    async def _entries(self) -> dict[str, dict[str, Any]]:
        """The models' catalog entries, downloading what is not there yet."""
        catalog = await self.client.hive("models", "catalog")
        entries = {m["id"]: m for m in catalog["models"]}
        missing = [m for m in dict.fromkeys(self.models) if m not in entries]
        if missing:
            raise RbeeError(
                f"model(s) {', '.join(missing)} not registered on {self.client.pool.name}",
                f"see `rbee-tui pool {self.client.pool.name} models catalog`",
            )
        fetched = False
        for model in dict.fromkeys(self.models):
            if not entries[model]["downloaded"]:
                self.note(f"downloading {model}")
                final: dict[str, Any] = {}
                async for ev in self.client.hive_stream("models", "download", model):
                    final = ev
                if final.get("event") != "done":
                    raise RbeeError(f"download of {model} failed: {final.get('error', 'no result')}")
                fetched = True
        if fetched:  # the catalog's memory prediction is given for downloaded models
            catalog = await self.client.hive("models", "catalog")
            entries = {m["id"]: m for m in catalog["models"]}
        return entries

    async def _budget(self) -> int:
        """What new workers may use on the node now, as the node's own spawn check computes it."""
        from rbee_tui.capacity import free_for_workers

        status = await self.client.hive("status")
        # As the node counts its workers: each at its RSS or its prediction, whichever is larger.
        live = [w for w in await self.client.workers() if w.get("state") != "exited"]
        used = sum(max(int(w.get("rss_bytes") or 0), int(w.get("predicted_bytes") or 0)) for w in live)
        pool = self.client.pool
        return free_for_workers(
            int(status["ram_available"]), int(status["ram_total"]), pool.memory_budget, pool.reserve, used
        )

    async def _reading(self) -> Sample | None:
        """One sample taken now (the sampling stream's interval may be longer than a short load)."""
        with contextlib.suppress(RbeeError, ValueError, KeyError, TypeError):
            return Sample.parse(await self.client.hive("metrics", "--interval", "0.2", "--count", "1"))
        return None

    async def _load(self, w: dict[str, Any], seed: int, once: bool = False) -> tuple[int, float]:
        """Requests against one worker: one (`once`, or when `seconds` is 0), or back to back for `seconds`;
        (tokens, seconds of generation)."""
        import aiohttp

        tokens, busy = 0, 0.0
        deadline = time.monotonic() + (0.0 if once else self.seconds)
        body = {"prompt": PROMPT, "max_tokens": self.max_tokens, "temperature": 0.7, "seed": seed}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            while True:
                summary: dict[str, Any] = {}
                try:
                    async for ev in execute(session, w["client_url"], w["engine"], body):
                        if ev["event"] == "done":
                            summary = ev
                except (aiohttp.ClientError, RuntimeError) as exc:
                    raise RbeeError(f"worker {w['id']} ({w['model']}) failed: {exc}") from None
                n = int(summary.get("tokens_generated") or 0)
                if n <= 0 or not summary.get("tokens_per_sec"):
                    raise RbeeError(f"worker {w['id']} ({w['model']}) generated no tokens")
                tokens += n
                busy += n / float(summary["tokens_per_sec"])
                if time.monotonic() >= deadline:
                    return tokens, busy

    async def _alone(self, model: str) -> float | None:
        """One worker of `model` with the node to itself: its tokens/s after a warm-up request (None when even
        one does not fit: the packing's own spawn of it is refused too, with the numbers)."""
        try:
            w = await self.client.spawn_worker(self.backend, model, timeout=600, on_spawned=self.started.append)
        except RbeeError as exc:
            if _wont_fit(exc):
                return None
            raise
        try:
            await self._load(w, self.seed, once=True)  # warm-up: first pages of the weights read in
            tokens, busy = await self._load(w, self.seed)
            return tokens / busy
        finally:
            self.started = [s for s in self.started if s["id"] != w["id"]]
            await asyncio.shield(self.client.stop_worker(w["id"]))

    def _listener(self, watch: Watch) -> Callable[[PoolEvent], None]:
        def listen(event: PoolEvent) -> None:
            if isinstance(event, SampleReceived):
                watch.add(event.sample)

        return listen

    async def _together(self, watch: Watch) -> dict[str, float]:
        """Every started worker generating at once, sampled while it runs; each worker's tokens/s."""
        load = asyncio.gather(*(self._load(w, self.seed + i) for i, w in enumerate(self.started)))
        poll = asyncio.ensure_future(self._poll(watch, load))
        try:
            results = await load
        finally:
            await poll
        return {w["id"]: t / b for w, (t, b) in zip(self.started, results, strict=True)}

    async def _poll(self, watch: Watch, load: asyncio.Future[Any]) -> None:
        """Samples taken while the load runs, at least one whatever its length."""
        while True:
            reading = await self._reading()
            if reading is not None and not load.done():
                watch.add(reading)
            if load.done():
                return

    async def _last_readings(self, watch: Watch) -> None:
        """Each worker's memory and the swap counters once more after the load (a load shorter than a sample
        still has them)."""
        last = await self._reading()
        if last is not None and last.swap.sin is not None and last.swap.sout is not None:
            watch.swap_io_end = max(watch.swap_io_end or 0, last.swap.sin + last.swap.sout)
        for row in await self.client.workers():
            if row.get("rss_bytes"):
                watch.rss_peak[row["id"]] = max(watch.rss_peak.get(row["id"], 0), int(row["rss_bytes"]))

    async def _stop_all(self) -> list[str]:
        """Stop every worker this packing started; the ids the node still lists afterwards. A stop that fails
        (the node's agent ending under a Ctrl-C of the whole terminal, say) is tried once more."""
        left = sorted({w["id"] for w in self.started})
        self.started = []
        for _ in range(2):
            if not left:
                return []
            for wid in left:
                with contextlib.suppress(RbeeError):
                    await self.client.stop_worker(wid)
            with contextlib.suppress(RbeeError):
                listed = await self.client.workers()
                left = [w["id"] for w in listed if w["id"] in left and w.get("state") != "exited"]
        return left


def _wont_fit(exc: RbeeError) -> bool:
    """Whether a spawn was refused because the model does not fit the pool's memory now."""
    from rbee_tui.capacity import WontFit

    return isinstance(exc, WontFit)
