"""One pool as the dashboard sees it: its connection's life, `rbee-hive` calls, the metrics stream, tunnels.

The client keeps itself connected: it reconnects with backoff, restarts the metrics stream, re-opens the
tunnels of workers that are still alive on the node (adopting them from the node's registry, never spawning
them again), and reports every change to its listeners. A lost pool never blocks anything else: every call
fails fast with the reason while the pool is not connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from rbee_tui import PROTOCOL, __version__
from rbee_tui.capacity import WontFit
from rbee_tui.config import PoolConfig
from rbee_tui.errors import RbeeError
from rbee_tui.pools.agent import Agent
from rbee_tui.pools.transport import (
    INSTALL_HINT,
    LocalTransport,
    SSHTransport,
    hive_args,
    hive_argv,
    make_transport,
)
from rbee_tui.sample import Sample

CONNECTING, CONNECTED, LOST, RECONNECTING = "connecting", "connected", "lost", "reconnecting"
HISTORY = 1200  # 20 minutes at one sample a second


class PoolUnreachable(RbeeError):
    """The pool could not be reached (not connected, or the connection broke during the call)."""


@dataclass(frozen=True)
class StateChanged:
    """The pool connected, was lost or is reconnecting; `error` is the typed failure behind a lost pool."""

    pool: str
    state: str
    reason: str
    error: RbeeError | None = None


@dataclass(frozen=True)
class SampleReceived:
    """A metrics sample came in from the pool."""

    pool: str
    sample: Sample


@dataclass(frozen=True)
class WorkersListed:
    """The pool's worker list was read (or one worker in it changed)."""

    pool: str
    workers: tuple[dict[str, Any], ...]


PoolEvent = StateChanged | SampleReceived | WorkersListed


@dataclass
class PoolView:
    """What is known about a pool right now (read by the UI, written by the client)."""

    name: str
    state: str = CONNECTING
    reason: str = ""
    status: dict[str, Any] = field(default_factory=dict)
    last_sample: Sample | None = None
    history: deque[Sample] = field(default_factory=lambda: deque(maxlen=HISTORY))
    workers: list[dict[str, Any]] = field(default_factory=list)
    # The last failure as its typed error (HostKeyUnknown opens the trust dialog); None while connected.
    error: RbeeError | None = None


class PoolClient:
    """Drives one pool. `start()` runs the connection loop in the background; `close()` ends it."""

    def __init__(
        self,
        pool: PoolConfig,
        *,
        sample_interval: float = 1.0,
        keepalive_interval: float = 4.0,
        keepalive_count_max: int = 2,
        max_backoff: float = 30.0,
        missed_samples: int = 5,
    ) -> None:
        if pool.transport == "ssh":
            SSHTransport.check(pool)  # refuse a bad host or user before anything runs
        self.pool = pool
        self.view = PoolView(pool.name)
        self.sample_interval = sample_interval
        self.max_backoff = max_backoff
        self.missed_samples = missed_samples
        self._ssh = {"keepalive_interval": keepalive_interval, "keepalive_count_max": keepalive_count_max}
        self.transport: LocalTransport | SSHTransport | None = None
        self.agent: Agent | None = None  # `rbee-hive serve` on the node; None: one process per call
        self._agent_retry_at = 0.0
        self._agent_lock = asyncio.Lock()
        self.listeners: list[Callable[[PoolEvent], None]] = []
        self.tunnels: dict[str, tuple[int, int, Any]] = {}  # worker id -> (node port, local port, listener)
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self.version_note = ""

    # -- life ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting (and keep reconnecting) in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._life(), name=f"pool:{self.pool.name}")

    async def close(self) -> None:
        """Stop the background work and close the connection."""
        task, self._task = self._task, None
        # Cancel until it is done: a cancellation that lands as an awaited result arrives can be lost on the way
        # (asyncio.wait_for before 3.12 drops it); the pause leaves room for the task's own clean-up.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=5)
        await self._drop_transport()

    async def first_outcome(self, timeout: float) -> str:
        """Wait for the first attempt to end, connected or lost (one-shot commands should not retry)."""
        deadline = time.monotonic() + timeout
        while self.view.state not in (CONNECTED, LOST) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.view.state

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the pool is connected, or raise with its last reason."""
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            raise RbeeError(f"pool {self.pool.name} is {self.view.state}: {self.view.reason or 'no answer'}") from None

    def _emit(self, event: PoolEvent) -> None:
        for listener in list(self.listeners):
            listener(event)

    def _set_state(self, state: str, reason: str = "") -> None:
        if (state, reason) == (self.view.state, self.view.reason):
            return
        self.view.state, self.view.reason = state, reason
        if state == CONNECTED:
            self._connected.set()
        else:
            self._connected.clear()
        self._emit(StateChanged(self.pool.name, state, reason, getattr(self.view, "error", None)))

    async def _start_agent(self) -> None:
        """Start `rbee-hive serve` on the node; without it (an older agent) every call starts its own process."""
        assert self.transport is not None
        self._agent_retry_at = time.monotonic() + 5.0
        try:
            channel = await self.transport.stream(hive_argv(self.pool, "serve", json_output=False), stdin=True)
            self.agent = await Agent.open(channel)
        except Exception:  # no agent: calls run one process each, as with an older rbee-hive
            self.agent = None

    async def _live_agent(self) -> Agent | None:
        if self.agent is not None and self.agent.alive:
            return self.agent
        async with self._agent_lock:  # many calls may find it gone at once: start one
            if self.agent is not None and not self.agent.alive:  # it ended under a live connection
                await self.agent.close()
                self.agent = None
            if self.agent is None and self.transport is not None and time.monotonic() >= self._agent_retry_at:
                await self._start_agent()
        return self.agent

    async def _drop_transport(self) -> None:
        agent, self.agent = self.agent, None
        if agent is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await agent.close()
        for _, _, listener in self.tunnels.values():
            if listener is not None:
                listener.close()
        transport, self.transport = self.transport, None
        if transport is not None:
            await transport.close()

    async def _life(self) -> None:
        backoff = 1.0
        while True:
            try:
                self.transport = make_transport(self.pool, **self._ssh)
                await self.transport.connect()
                await self._start_agent()
                await self._handshake()
            except (TimeoutError, RbeeError, OSError) as exc:
                await self._drop_transport()
                reason = str(exc) or type(exc).__name__
                self.view.error = exc if isinstance(exc, RbeeError) else PoolUnreachable(reason)
                self._set_state(LOST, reason)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                self._set_state(RECONNECTING, reason)
                continue
            backoff = 1.0
            self.view.error = None
            self._set_state(CONNECTED, self.version_note)
            await self._readopt()
            reason = await self._watch()
            await self._drop_transport()
            self.view.error = PoolUnreachable(reason)
            self._set_state(LOST, reason)
            await asyncio.sleep(min(1.0, self.max_backoff))
            self._set_state(RECONNECTING, reason)

    async def _handshake(self) -> None:
        version = await self._call("version", timeout=30)
        if version.get("protocol") != PROTOCOL:
            raise RbeeError(
                f"rbee-hive {version.get('agent_version')} on {self.pool.name} speaks protocol "
                f"{version.get('protocol')}, this dashboard {PROTOCOL}",
                INSTALL_HINT,
            )
        self.view.status = await self._call("status", timeout=30)
        self.version_note = ""
        if version.get("agent_version") != __version__:
            # Same protocol, other release: it works, but say so, with the command that aligns them.
            self.version_note = (
                f"rbee-hive {version.get('agent_version')} on the node, {__version__} here: "
                f"python3 -m pip install --user rbee-tui=={__version__}"
            )

    async def _watch(self) -> str:
        """Run the metrics stream until the connection ends; return why it ended."""
        assert self.transport is not None
        closed = asyncio.create_task(self.transport.wait_closed())
        metrics = asyncio.create_task(self._metrics_loop())
        try:
            await asyncio.wait({closed, metrics}, return_when=asyncio.FIRST_COMPLETED)
            if closed.done():
                return "connection closed" if closed.exception() is None else str(closed.exception())
            return metrics.result()
        finally:
            for task in (closed, metrics):
                task.cancel()
            await asyncio.wait({closed, metrics})  # unlike awaiting each, lets our own cancellation through
            for task in (closed, metrics):
                if not task.cancelled():
                    task.exception()  # retrieved: it was reported above, or does not matter any more

    async def _metrics_loop(self) -> str:
        """Keep one metrics stream open; restart it when it dies; give up only after several silent intervals."""
        failures = 0
        while True:
            assert self.transport is not None
            try:
                stream = await self.transport.stream(
                    hive_argv(self.pool, "metrics", "--interval", str(self.sample_interval))
                )
            except Exception as exc:  # the channel could not open: the connection is likely gone
                failures += 1
                if failures >= 3:
                    return f"metrics stream failed: {exc}"
                await asyncio.sleep(self.sample_interval)
                continue
            try:
                lines = stream.lines.__aiter__()
                while True:
                    timeout = self.sample_interval * self.missed_samples + 5
                    try:
                        async with asyncio.timeout(timeout):
                            line = await lines.__anext__()
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        return f"no metrics for {timeout:.0f}s"
                    try:
                        sample = Sample.parse(json.loads(line))  # parsed once, here; frozen from now on
                    except (ValueError, KeyError, TypeError, IndexError):
                        continue
                    failures = 0
                    self.view.last_sample = sample
                    self.view.history.append(sample)
                    self._emit(SampleReceived(self.pool.name, sample))
            finally:
                await stream.close()
            failures += 1
            if failures >= 3:
                return "the metrics stream keeps ending"
            await asyncio.sleep(self.sample_interval)

    async def _readopt(self) -> None:
        """After a (re)connect: learn the node's workers and re-open tunnels for those still alive."""
        try:
            workers = await self.workers()
        except RbeeError:
            return
        alive = {w["id"]: w for w in workers if w["state"] != "exited"}
        old = dict(self.tunnels)
        self.tunnels.clear()
        for wid, (port, _, _) in old.items():
            if wid in alive and alive[wid]["port"] == port:
                with contextlib.suppress(Exception):
                    await self.worker_url(alive[wid])

    # -- calls ---------------------------------------------------------------------------------------------

    async def _call(self, *args: str, timeout: float = 120) -> Any:
        if self.transport is None:
            raise PoolUnreachable(f"pool {self.pool.name} is {self.view.state}: {self.view.reason or 'no connection'}")
        try:
            agent = await self._live_agent()
            if agent is not None:
                rc, out, err = await agent.run(hive_args(self.pool, *args), timeout)
            else:
                rc, out, err = await self.transport.run(hive_argv(self.pool, *args), timeout)
        except TimeoutError:
            raise RbeeError(
                f"pool {self.pool.name}: `rbee-hive {' '.join(args)}` timed out after {timeout:.0f}s"
            ) from None
        except Exception as exc:  # the connection broke under the call
            raise PoolUnreachable(f"pool {self.pool.name}: {exc or type(exc).__name__}") from None
        lines = [line for line in out.splitlines() if line.strip()]
        last: Any = None
        if lines:
            try:
                last = json.loads(lines[-1])
            except ValueError:
                last = None
        if rc == 127 or (rc != 0 and last is None and "not found" in err):
            raise RbeeError(
                f"rbee-hive is not installed on {self.pool.name} ({err.strip() or 'exit 127'})", INSTALL_HINT
            )
        if rc != 0:
            if isinstance(last, dict) and last.get("kind") == WontFit.KIND:
                raise WontFit.from_json(last)  # typed, with its numbers: the message names the pool already
            if isinstance(last, dict) and "error" in last:
                raise RbeeError(f"pool {self.pool.name}: {last['error']}", last.get("hint"))
            if isinstance(last, dict) and last.get("problems"):  # e.g. `models verify`: what is wrong, not "exit 1"
                raise RbeeError(f"pool {self.pool.name}: {'; '.join(map(str, last['problems']))}")
            tail = (err.strip().splitlines() or [f"exit {rc}"])[-1]
            raise RbeeError(f"pool {self.pool.name}: {tail}")
        return last

    async def hive(self, *args: str, timeout: float = 120) -> Any:
        """Run `rbee-hive ARGS --json` on the pool and return its last JSON object."""
        if self.view.state != CONNECTED:
            raise PoolUnreachable(
                f"pool {self.pool.name} is {self.view.state}: {self.view.reason or 'not connected yet'}"
            )
        return await self._call(*args, timeout=timeout)

    async def hive_stream(self, *args: str) -> AsyncIterator[dict[str, Any]]:
        """Run a streaming `rbee-hive` command (download, logs --follow) and yield its JSON objects."""
        if self.transport is None or self.view.state != CONNECTED:
            raise PoolUnreachable(f"pool {self.pool.name} is {self.view.state}: {self.view.reason}")
        try:
            stream = await self.transport.stream(hive_argv(self.pool, *args))
        except Exception as exc:
            raise PoolUnreachable(f"pool {self.pool.name}: {exc or type(exc).__name__}") from None
        try:
            async for line in stream.lines:
                with contextlib.suppress(ValueError):
                    yield json.loads(line)
        finally:
            await stream.close()

    async def workers(self) -> list[dict[str, Any]]:
        """The node's workers, reconciled by the node."""
        doc = await self._call("worker", "list")
        self.view.workers = doc["workers"]
        self._emit(WorkersListed(self.pool.name, tuple(self.view.workers)))
        return self.view.workers

    async def wait_worker(self, worker_id: str, timeout: float = 300) -> dict[str, Any]:
        """Wait until the worker answers ready: `rbee-hive worker wait` blocks on the node, which asks only this
        worker's /health, until it is ready (returned) or has died (raised, with its reason)."""
        return await self.hive("worker", "wait", worker_id, "--timeout", str(timeout), timeout=timeout + 30)

    def _note_worker(self, worker: dict[str, Any]) -> None:
        """Put what the node said of one worker into the view, without reading every worker again."""
        self.view.workers = [*(w for w in self.view.workers if w["id"] != worker["id"]), worker]
        self._emit(WorkersListed(self.pool.name, tuple(self.view.workers)))

    async def worker_url(self, worker: dict[str, Any]) -> str:
        """A URL that reaches the worker from this machine: direct for the local pool, a tunnel for SSH pools."""
        if self.transport is None:
            raise RbeeError(f"pool {self.pool.name} is {self.view.state}: {self.view.reason}")
        if isinstance(self.transport, LocalTransport):
            return f"http://127.0.0.1:{worker['port']}"
        known = self.tunnels.get(worker["id"])
        if known and known[0] == worker["port"]:
            return f"http://127.0.0.1:{known[1]}"
        try:
            local, listener = await self.transport.forward(int(worker["port"]))
        except Exception as exc:
            raise PoolUnreachable(f"pool {self.pool.name}: no tunnel to port {worker['port']}: {exc}") from None
        self.tunnels[worker["id"]] = (int(worker["port"]), local, listener)
        return f"http://127.0.0.1:{local}"

    async def spawn_worker(
        self,
        backend: str,
        model: str,
        *extra: str,
        gpu: int = 0,
        timeout: float = 300,
        on_spawned: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Spawn a worker and wait until it is ready; return it, with `client_url` (where it answers from here).

        `on_spawned` hears of the worker as soon as the node has started it (it loads then). Cancelled at any
        point, this stops what the node started: no worker is left running that nobody knows of.
        """
        args = ["worker", "spawn", backend, "--model", model, "--gpu", str(gpu), *extra]
        # The pool's memory limits as this config has them: the node refuses what would not fit (WontFit).
        if self.pool.memory_budget is not None:
            args += ["--memory-budget", str(self.pool.memory_budget)]
        if self.pool.reserve is not None:
            args += ["--reserve", str(self.pool.reserve)]
        call = asyncio.ensure_future(self.hive(*args))
        try:
            # Shielded: a cancelled spawn still gets the node's answer, which names the worker to stop.
            w = await asyncio.shield(call)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.stop_worker((await call)["id"]))
            raise
        try:
            self._note_worker(w)  # listed at once, loading
            if on_spawned is not None:
                on_spawned(w)
            try:
                ready = await self.wait_worker(w["id"], timeout)
            except PoolUnreachable:
                raise
            except RbeeError:
                with contextlib.suppress(RbeeError):
                    await self.workers()  # the list shows how it ended
                raise
            self._note_worker(ready)
            ready["client_url"] = await self.worker_url(ready)
            return ready
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.stop_worker(w["id"]))
            raise

    async def stop_worker(self, worker_id: str) -> dict[str, Any]:
        """Stop a worker on the node and close its tunnel."""
        result = await self.hive("worker", "stop", worker_id)
        tunnel = self.tunnels.pop(worker_id, None)
        if tunnel and tunnel[2] is not None:
            tunnel[2].close()
        await self.workers()
        return result


async def probe(pool: PoolConfig, timeout: float = 20.0) -> dict[str, Any]:
    """Connect once and report: name, state, reason, and the node's status when connected."""
    client = PoolClient(pool, max_backoff=timeout)
    client.start()
    try:
        await client.first_outcome(timeout)
        view = client.view
        out: dict[str, Any] = {
            "name": pool.name,
            "transport": pool.transport,
            "state": view.state,
            "reason": view.reason or ("no answer" if view.state != CONNECTED else ""),
        }
        if view.state == CONNECTED:
            out["status"] = view.status
            out["workers"] = await client.workers()
        return out
    finally:
        await client.close()


async def passthrough(pool: PoolConfig, args: list[str], timeout: float = 3600.0) -> tuple[int, str, str]:
    """Run `rbee-hive ARGS` on a pool as typed (with or without --json); return exit status and output."""
    client = PoolClient(pool, max_backoff=20)
    client.start()
    try:
        if await client.first_outcome(20) != CONNECTED or client.transport is None:
            raise RbeeError(f"pool {pool.name} is {client.view.state}: {client.view.reason or 'no answer'}")
        json_wanted = "--json" in args
        argv = hive_argv(pool, *[a for a in args if a != "--json"], json_output=json_wanted)
        return await client.transport.run(argv, timeout)
    finally:
        await client.close()


async def gather_pools_config(pools: tuple[PoolConfig, ...], fn: Callable[[PoolConfig], Any]) -> list[Any]:
    """Run `fn` on every pool at once; one dead pool's exception is its result, never the others' failure."""
    return await asyncio.gather(*(fn(p) for p in pools), return_exceptions=True)
