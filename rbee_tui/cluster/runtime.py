"""A cluster worker: one model split over pools with llama.cpp RPC, started, relayed, watched and stopped.

The head pool (the first given) holds the model file and runs the coordinator, a llama-server worker of kind
`cluster` spawned through its node's worker machinery; every node of the placement runs `ggml-rpc-server`
(`rbee-hive rpc start`). Nothing listens beyond a node's loopback: this machine relays each coordinator-to-node
link through the SSH connections it already holds (a local forward on the node's connection, a remote forward
on the head's), unless the pool sets `rpc_host`. The relays live in this process, so the process that spawned a
cluster also watches it (`Cluster.watch`): a dead rpc-server, a lost pool or a running request that stops
producing anything ends the cluster (coordinator first, then the RPC servers, then the relays), and one
restart is tried on the nodes still up.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from rbee_tui.capacity import free_for_workers
from rbee_tui.cluster.front import Front
from rbee_tui.cluster.layers import ModelShape, shape_from_json
from rbee_tui.cluster.meter import Meter
from rbee_tui.cluster.planner import DEFAULT_MARGIN, MiB, NodeFree, Placement, Refusal, plan
from rbee_tui.errors import RbeeError
from rbee_tui.pools.client import CONNECTED, PoolClient

STALL_S = 10.0  # a running request that gets nothing from the coordinator this long: a silent RPC link
POLL_S = 1.0
CALL_TIMEOUT_S = 5.0
_USING = re.compile(r"using device (RPC\d+) \((\S+)\)")
_ASSIGNED = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")
# `load_tensors: RPC0[127.0.0.1:50052] model buffer size =  24.02 MiB`, `llama_context:  CPU  output buffer ...`
_BUFFER = re.compile(r"(?<!\S)(\S+)\s+(model|KV|compute|output) buffer size =\s*([\d.]+) MiB")
_RPC_BUFFER = re.compile(r"RPC\d+\[(\S+)\]$")


@dataclass
class Node:
    """A pool as the cluster sees it: free memory, its rpc-server, why it cannot take part."""

    name: str
    client: PoolClient
    free_bytes: int = 0
    limit_bytes: int | None = None  # the pool's memory_budget/reserve room, when its config sets one
    down: str = ""
    rpc: dict[str, Any] = field(default_factory=dict)  # `rbee-hive rpc status`


@dataclass
class Running:
    """What one start of the cluster put in place."""

    placement: Placement
    endpoints: list[str]  # --rpc, as the coordinator on the head dials them
    servers: dict[str, dict[str, Any]]  # pool -> its rpc-server
    relays: list[Any]  # SSH listeners to close
    coordinator: dict[str, Any] | None = None
    args: list[str] = field(default_factory=list)


class Cluster:
    """One model over `pools` (the head first): plan, spawn, watch, stop."""

    def __init__(
        self,
        clients: dict[str, PoolClient],
        model: str,
        pools: list[str],
        *,
        head: str | None = None,
        ctx: int = 2048,
        policy: str = "fewest",
        margin: float = DEFAULT_MARGIN,
        threads: int | None = None,
        verbose: bool = False,
        stall_s: float = STALL_S,
        poll_s: float = POLL_S,
        restarts: int = 1,
        meter: bool = False,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if not pools:
            raise RbeeError("a cluster needs at least one pool", "e.g. --pools local,node2")
        if len(set(pools)) != len(pools):
            raise RbeeError("a pool is named twice in --pools")
        self.head = head or pools[0]
        if self.head not in pools:
            raise RbeeError(f"the head {self.head} is not one of --pools", f"pools: {', '.join(pools)}")
        self.pools = [self.head, *(p for p in pools if p != self.head)]
        missing = [p for p in self.pools if p not in clients]
        if missing:
            raise RbeeError(f"no connection to pool(s) {', '.join(missing)}")
        self.clients = clients
        self.model = model
        self.ctx = ctx
        self.policy = policy
        self.margin = margin
        self.threads = threads
        self.verbose = verbose
        self.stall_s = stall_s
        self.poll_s = poll_s
        self.restarts_left = restarts
        self.on_event = on_event
        self.meter = meter  # count each relayed node's bytes (cluster/meter.py): one more hop, so opt-in
        self.meters: dict[str, Meter] = {}  # pool -> the meter on its relay (nodes reached directly have none)
        self.front: Front | None = None
        self.running: Running | None = None
        self.shape: ModelShape | None = None
        self.head_info: dict[str, Any] = {}
        self.state = "new"
        self.reason = ""
        self.events: list[dict[str, Any]] = []
        self.to_clean: set[str] = set()  # pools whose rpc-server could not be stopped yet (unreachable)

    # -- planning -------------------------------------------------------------------------------------------

    def _emit(self, event: str, **data: Any) -> dict[str, Any]:
        doc = {"event": event, "at": round(time.time(), 3), **data}
        self.events.append(doc)
        if self.on_event is not None:
            self.on_event(doc)
        return doc

    def _rpc_opts(self, name: str) -> list[str]:
        pool = self.clients[name].pool
        opts = ["--rpc-server", pool.rpc_server] if pool.rpc_server else []
        return opts + (["--llama-server", pool.llama_server] if pool.llama_server else [])

    async def _node(self, name: str) -> Node:
        client = self.clients[name]
        node = Node(name, client)
        if client.view.state != CONNECTED:
            node.down = f"pool {client.view.state}: {client.view.reason or 'not connected'}"
            return node
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S * 3):
                status, rpc = await asyncio.gather(
                    client.hive("status"), client.hive("rpc", "status", *self._rpc_opts(name))
                )
        except (RbeeError, TimeoutError) as exc:
            node.down = str(exc) or "no answer"
            return node
        node.rpc = rpc
        node.free_bytes = int(status.get("ram_available") or 0)
        if client.pool.memory_budget is not None or client.pool.reserve is not None:
            # The pool's own room (rbee_tui/capacity.py); without one, the planner keeps its margin of what is free.
            sample = client.view.last_sample
            used = sum(w.rss_bytes or 0 for w in sample.workers if w.alive) if sample else 0
            node.limit_bytes = free_for_workers(
                node.free_bytes, int(status.get("ram_total") or 0), client.pool.memory_budget, client.pool.reserve, used
            )
        if rpc.get("missing"):
            node.down = rpc["missing"]
        return node

    async def survey(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[Node]:
        """The head's model shape and llama.cpp build, and every pool's free memory and rpc-server."""
        head = self.clients[self.head]
        if self.head in exclude or head.view.state != CONNECTED:
            raise RbeeError(f"the head {self.head} is not reachable: {head.view.reason or head.view.state}")
        llama = ["--llama-server", head.pool.llama_server] if head.pool.llama_server else []
        self.head_info = await head.hive("rpc", "shape", "--model", self.model, *llama)
        self.shape = shape_from_json(self.head_info["shape"])
        nodes = await asyncio.gather(*(self._node(n) for n in self.pools if n not in exclude))
        build = self.head_info["build"]
        for node in nodes:
            if node.down:
                continue
            server = node.rpc.get("server") or {}
            if node.rpc.get("running") and server.get("busy"):
                raise RbeeError(
                    f"the rpc-server of {node.name} ({server.get('endpoint')}) is busy: it serves another coordinator",
                    f"stop that cluster first (rbee-tui cluster stop), or leave {node.name} out of --pools",
                )
            theirs = server.get("build") if node.rpc.get("running") else node.rpc.get("build")
            if theirs != build:
                raise RbeeError(
                    f"{node.name} runs llama.cpp build {theirs}, the head {self.head} runs {build}: "
                    "RPC needs the same build on every node",
                    f"build it there: `rbee-tui pool {node.name} setup --expect {build}`, or leave it out of --pools",
                )
        return list(nodes)

    def place(self, nodes: list[Node]) -> Placement:
        """The placement of the model on `nodes` (raises Refusal with needed vs free)."""
        assert self.shape is not None
        free = [NodeFree(n.name, n.free_bytes, down_reason=n.down, limit_bytes=n.limit_bytes) for n in nodes]
        return plan(self.shape, free, self.ctx, policy=self.policy, margin=self.margin)

    async def plan(self) -> Placement:
        """Survey the pools and plan, starting nothing."""
        return self.place(await self.survey())

    # -- start ----------------------------------------------------------------------------------------------

    async def _rpc_server(self, node: Node) -> dict[str, Any]:
        if node.rpc.get("running"):
            return node.rpc["server"]  # idle (a busy one was refused): this cluster takes it
        pool = node.client.pool
        args = ["rpc", "start", *self._rpc_opts(node.name)]
        if pool.rpc_host:
            args += ["--host", pool.rpc_host]
        if self.threads:
            args += ["--threads", str(self.threads)]
        return await node.client.hive(*args, timeout=60)

    async def _endpoint(self, name: str, server: dict[str, Any], relays: list[Any]) -> str:
        """host:port of `name`'s rpc-server as the coordinator on the head dials it."""
        port = int(server["port"])
        if name == self.head:
            return f"{server['host']}:{port}"
        pool = self.clients[name].pool
        if pool.rpc_host:
            return f"{pool.rpc_host}:{port}"  # the pool opted in to its LAN address: no relay
        node_t, head_t = self.clients[name].transport, self.clients[self.head].transport
        if node_t is None or head_t is None:
            raise RbeeError(f"no connection to {name if node_t is None else self.head} for the relay")
        here, listener = await node_t.forward(port)  # this machine -> the node's loopback
        if listener is not None:
            relays.append(listener)
        if self.meter:
            meter = Meter(here)
            here = await meter.start()
            relays.append(meter)
            self.meters[name] = meter
        there, listener = await head_t.reverse(here)  # the head's loopback -> this machine
        if listener is not None:
            relays.append(listener)
        return f"127.0.0.1:{there}"

    def coordinator_args(self, placement: Placement, endpoints: list[str]) -> list[str]:
        """llama-server's arguments: the placement's, with the endpoints the head dials."""
        shares = placement.shares
        if len(shares) == 1 and shares[0].name == self.head:
            args = placement.server_args()  # the head alone: no RPC at all
        else:
            args = ["--rpc", ",".join(endpoints), "--tensor-split", ",".join(str(s.split) for s in shares)]
            args += ["-ngl", str(placement.n_layer + 1), "-c", str(placement.ctx)]
            if placement.kv_type != "f16":
                args += ["-ctk", placement.kv_type, "-ctv", placement.kv_type]
            args += ["--fit", "off"]
        return args + (["-v"] if self.verbose else [])

    async def start(self, placement: Placement, nodes: list[Node]) -> dict[str, Any]:
        """Start the RPC servers, the relays and the coordinator; return the ready event."""
        by_name = {n.name: n for n in nodes}
        rpc_needed = not (len(placement.shares) == 1 and placement.shares[0].name == self.head)
        run = Running(placement, [], {}, [])
        self.running = run
        self.state = "starting"
        if rpc_needed:
            names = [s.name for s in placement.shares]
            results = await asyncio.gather(*(self._rpc_server(by_name[n]) for n in names), return_exceptions=True)
            for name, res in zip(names, results, strict=True):
                if not isinstance(res, BaseException):
                    run.servers[name] = res
            errors = [(n, r) for n, r in zip(names, results, strict=True) if isinstance(r, BaseException)]
            if errors:
                await self._teardown()
                name, exc = errors[0]
                raise RbeeError(f"cannot start the rpc-server on {name}: {exc}")
            try:
                for name in names:
                    run.endpoints.append(await self._endpoint(name, run.servers[name], run.relays))
            except Exception as exc:
                await self._teardown()
                raise RbeeError(f"cannot relay to the rpc-servers: {exc}") from None
        run.args = self.coordinator_args(placement, run.endpoints)
        head = self.clients[self.head]
        extra = [
            "--engine",
            "llama-server",
            "--llama-server",
            self.head_info["llama_server"],
            "--n-ctx",
            str(placement.ctx),
            "--kind",
            "cluster",
            f"--server-args={shlex.join(run.args)}",
        ]
        try:
            run.coordinator = await head.spawn_worker("cpu", self.model, *extra, timeout=600)
        except BaseException:
            await self._teardown()
            raise
        url = run.coordinator["client_url"]
        if self.front is None:
            self.front = Front(url)
            await self.front.start()
        else:
            self.front.retarget(url)
        self.state = "ready"
        return self._emit("ready", **self.describe())

    async def spawn(self) -> dict[str, Any]:
        """Survey, plan, start; the ready event (with `port`, where this machine reaches the coordinator)."""
        nodes = await self.survey()
        return await self.start(self.place(nodes), nodes)

    # -- what it is -----------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Nodes, layer ranges, shares and memory, the coordinator, the port: what `cluster status` shows."""
        out: dict[str, Any] = {"model": self.model, "head": self.head, "state": self.state, "reason": self.reason}
        run = self.running
        if run is None:
            return out
        p = run.placement
        weights = sum(s.weight_bytes for s in p.shares) or 1
        out["nodes"] = [
            {
                "pool": s.name,
                "layers": [s.first_layer, s.stop_layer - 1],
                "output": s.output,
                "coordinator": s.name == self.head,
                "share": round(s.weight_bytes / weights, 4),
                "memory_bytes": s.total_bytes,
                "free_bytes": s.node.free_bytes,
                "endpoint": run.endpoints[i] if i < len(run.endpoints) else None,
                "rpc_pid": (run.servers.get(s.name) or {}).get("worker_pid"),
                "rpc_port": (run.servers.get(s.name) or {}).get("port"),
                "devices": (run.servers.get(s.name) or {}).get("devices", []),
            }
            for i, s in enumerate(p.shares)
        ]
        out.update(policy=p.policy, ctx=p.ctx, needed_bytes=p.needed_bytes, left_out=list(p.left_out), args=run.args)
        if run.coordinator is not None:
            out["coordinator"] = {k: run.coordinator.get(k) for k in ("id", "port", "url", "client_url", "engine")}
        if self.front is not None:
            out["port"] = self.front.port
            out["url"] = f"http://127.0.0.1:{self.front.port}"
        return out

    async def reported_layers(self) -> dict[int, str]:
        """Which pool llama.cpp put each layer on (the coordinator's -v log); the output layer is n_layer."""
        run = self.running
        if run is None or run.coordinator is None:
            return {}
        doc = await self.clients[self.head].hive("worker", "logs", run.coordinator["id"], "--lines", "20000")
        lines = doc.get("lines", [])
        pool_of = {ep: s.name for ep, s in zip(run.endpoints, run.placement.shares, strict=False)}
        # RPC devices are numbered in --rpc order, one per server here; the "using device" lines confirm it when
        # the log still holds them (`worker logs` reads the end of a log).
        device_pool = {f"RPC{i}": s.name for i, s in enumerate(run.placement.shares)}
        device_pool.update(
            {m.group(1): pool_of.get(m.group(2), m.group(2)) for ln in lines if (m := _USING.search(ln))}
        )
        return {int(m.group(1)): device_pool.get(m.group(2), m.group(2)) for ln in lines if (m := _ASSIGNED.search(ln))}

    async def reported_memory(self) -> dict[str, dict[str, int]]:
        """What llama.cpp says each pool holds after load (the coordinator's log), in bytes by kind.

        An RPC server's buffers ('model', 'KV', 'compute') go to the pool whose endpoint they name; every other
        buffer (CPU_Mapped, CPU, ...) is the coordinator's own, on the head, as 'host model', 'host compute' ...
        """
        run = self.running
        if run is None or run.coordinator is None:
            return {}
        doc = await self.clients[self.head].hive("worker", "logs", run.coordinator["id"], "--lines", "20000")
        pool_of = {ep: s.name for ep, s in zip(run.endpoints, run.placement.shares, strict=False)}
        out: dict[str, dict[str, int]] = {}
        for name, kinds in reported_buffers(doc.get("lines", [])).items():
            m = _RPC_BUFFER.match(name)
            pool = pool_of.get(m.group(1), m.group(1)) if m else self.head
            into = out.setdefault(pool, {})
            for kind, n in kinds.items():
                key = kind if m else f"host {kind}"
                into[key] = into.get(key, 0) + n
        return out

    # -- watch ----------------------------------------------------------------------------------------------

    async def _rpc_alive(self, name: str) -> str:
        """'' while `name`'s rpc-server runs, else why not."""
        client = self.clients[name]
        if client.view.state != CONNECTED:
            return f"pool {name} is {client.view.state} ({client.view.reason or 'no connection'})"
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                doc = await client.hive("rpc", "status", timeout=CALL_TIMEOUT_S)
        except (RbeeError, TimeoutError) as exc:
            return f"pool {name} does not answer ({exc or 'timed out'})"
        server = doc.get("server") or {}
        if not doc.get("running"):
            return f"the rpc-server on {name} ended ({server.get('reason') or 'stopped'})"
        return ""

    async def _coordinator_alive(self) -> str:
        run = self.running
        assert run is not None and run.coordinator is not None
        client = self.clients[self.head]
        if client.view.state != CONNECTED:
            return f"the head {self.head} is {client.view.state} ({client.view.reason})"
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                workers = await client.workers()
        except (RbeeError, TimeoutError) as exc:
            return f"the head {self.head} does not answer ({exc or 'timed out'})"
        me = next((w for w in workers if w["id"] == run.coordinator["id"]), None)
        if me is None:
            return "the coordinator was stopped"
        if me["state"] == "exited":
            return f"the coordinator ended ({me.get('reason')})"
        return ""

    async def check(self) -> tuple[str, set[str]]:
        """('', set()) while the cluster is healthy, else the reason and the pools at fault."""
        run = self.running
        if run is None:
            return "", set()
        names = [s.name for s in run.placement.shares] if run.servers else []
        for name in {self.head, *names}:
            view = self.clients[name].view
            if view.state != CONNECTED:
                return f"pool {name} is lost ({view.reason or view.state})", {name}
        if self.front is not None and (stuck := self.front.stalled(self.stall_s)) is not None:
            return (
                f"the coordinator produced nothing for {self.stall_s:.0f}s during a request to {stuck.path} "
                "(an RPC link is silent)",
                set(),
            )
        results = await asyncio.gather(self._coordinator_alive(), *(self._rpc_alive(n) for n in names))
        bad = {n for n, why in zip(names, results[1:], strict=True) if why}
        why = next((r for r in results[1:] if r), "") or results[0]
        return why, bad

    async def watch(self, stopping: asyncio.Event | None = None) -> None:
        """Supervise until `stopping` is set or the cluster fails for good; one restart on the nodes still up."""
        stopping = stopping or asyncio.Event()
        while not stopping.is_set():
            await self._clean_pending()
            why, bad = await self.check() if self.state == "ready" else ("", set())
            if why:
                await self.fail(why, bad)
                if self.state != "ready":
                    return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await stopping.wait()

    async def fail(self, reason: str, bad: set[str]) -> None:
        """End the cluster with `reason` (running requests fail with it), then try one restart without `bad`."""
        t0 = time.monotonic()
        self.state, self.reason = "failed", reason
        if self.front is not None:
            self.front.fail(reason)
        await self._teardown(grace=2.0)
        self._emit("failed", reason=reason, pools=sorted(bad), teardown_s=round(time.monotonic() - t0, 2))
        if self.restarts_left <= 0:
            return
        self.restarts_left -= 1
        try:
            nodes = await self.survey(exclude=bad)
            # a node the survey could not reach is down too; the planner leaves it out and names it
            placement = self.place(nodes)
        except Refusal as exc:
            self._emit("restart_refused", reason=str(exc), needed_bytes=exc.needed_bytes, free_bytes=exc.free_bytes)
            return
        except RbeeError as exc:
            self._emit("restart_refused", reason=str(exc))
            return
        try:
            ready = await self.start(placement, nodes)
        except RbeeError as exc:
            self.state = "failed"
            self._emit("restart_failed", reason=str(exc))
            return
        without = ", ".join(sorted(bad)) or "the same nodes"
        self._emit(
            "restarted",
            reason=f"restarted on {', '.join(s.name for s in placement.shares)} after: {reason} (left out: {without})",
            port=ready.get("port"),
        )

    # -- stop -----------------------------------------------------------------------------------------------

    async def _teardown(self, grace: float = 10.0) -> None:
        """Coordinator first (llama-server crashes at exit when its RPC servers go first), then the RPC servers,
        then the relays. After a failure `grace` is short: a llama-server blocked on a silent link never exits
        by itself, and the requests have already been told."""
        run = self.running
        if run is None:
            return
        head = self.clients[self.head]
        if run.coordinator is not None:
            wid = run.coordinator["id"]
            with contextlib.suppress(RbeeError):
                await head.hive("worker", "stop", wid, "--grace", str(grace), timeout=grace + 60)
            tunnel = head.tunnels.pop(wid, None)
            if tunnel and tunnel[2] is not None:
                tunnel[2].close()
            if head.view.state == CONNECTED:
                with contextlib.suppress(RbeeError):
                    await head.workers()
            run.coordinator = None

        async def stop_rpc(name: str) -> None:
            try:
                await self.clients[name].hive("rpc", "stop", "--grace", str(min(grace, 5.0)), timeout=30)
                self.to_clean.discard(name)
            except RbeeError:
                self.to_clean.add(name)  # unreachable now: stopped when its pool answers again

        await asyncio.gather(*(stop_rpc(n) for n in run.servers))
        for listener in run.relays:
            with contextlib.suppress(Exception):
                listener.close()
        run.relays.clear()

    async def _clean_pending(self) -> None:
        for name in list(self.to_clean):
            if self.clients[name].view.state == CONNECTED:
                with contextlib.suppress(RbeeError):
                    await self.clients[name].hive("rpc", "stop", timeout=30)
                    self.to_clean.discard(name)
                    self._emit("cleaned", pool=name)

    async def stop(self) -> dict[str, Any]:
        """Stop everything this cluster started, in order; close the front port."""
        await self._teardown()
        if self.front is not None:
            await self.front.close()
        self.state = "stopped"
        return self._emit("stopped", pending=sorted(self.to_clean))


def reported_buffers(lines: Iterable[str]) -> dict[str, dict[str, int]]:
    """The buffers a llama.cpp log reports, by buffer name ('RPC0[127.0.0.1:50052]', 'CPU_Mapped', 'CPU') and kind
    ('model', 'KV', 'compute', 'output'), in bytes to the 0.01 MiB it prints; a name logged twice for a kind (one
    model buffer per file of a split model) adds up."""
    out: dict[str, dict[str, int]] = {}
    for ln in lines:
        if m := _BUFFER.search(ln):
            kinds = out.setdefault(m.group(1), {})
            kinds[m.group(2)] = kinds.get(m.group(2), 0) + round(float(m.group(3)) * MiB)
    return out


def describe_plan(placement: Placement) -> list[dict[str, Any]]:
    """A placement's nodes as JSON: layer ranges, memory, free."""
    return [
        {
            "pool": s.name,
            "layers": [s.first_layer, s.stop_layer - 1],
            "output": s.output,
            "memory_bytes": s.total_bytes,
            "free_bytes": s.node.free_bytes,
            "weight_bytes": s.weight_bytes,
            "kv_bytes": s.kv_bytes,
            "compute_bytes": s.compute_bytes,
        }
        for s in placement.shares
    ]
