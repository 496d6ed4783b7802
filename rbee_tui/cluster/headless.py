"""`rbee-tui cluster plan|spawn|stop|status`: a cluster worker from the command line.

`spawn` stays in the foreground: it holds the SSH relays between the coordinator and the nodes, and it is the
cluster's watcher (failures, the one restart). It prints the ready event first (the port where this machine
reaches the coordinator), then one line per event, and runs until Ctrl-C, SIGTERM or `cluster stop` (which
signals it), or until the cluster fails for good. A state file per model ($XDG_STATE_HOME/rbee/clusters/)
tells `status` and `stop` where it is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from rbee_tui import config as cfgmod
from rbee_tui import files
from rbee_tui.cluster.planner import DEFAULT_MARGIN, gb
from rbee_tui.cluster.runtime import Cluster, describe_plan
from rbee_tui.errors import RbeeError
from rbee_tui.names import check_id
from rbee_tui.pools.client import CONNECTED, PoolClient

STOP_WAIT_S = 90.0


def add_parser(sub: Any) -> None:
    """The `cluster` subcommand of rbee-tui."""
    cluster = sub.add_parser("cluster", help="one model split over several pools (llama.cpp RPC)")
    csub = cluster.add_subparsers(dest="cluster_cmd", required=True, metavar="ACTION")
    for name, text in (
        ("plan", "show where each layer would go, starting nothing"),
        ("spawn", "start the RPC servers, the relays and the coordinator; stay and watch them"),
        ("stop", "stop a cluster: coordinator first, then the RPC servers, then the relays"),
        ("status", "a cluster's nodes, layer ranges, shares and memory"),
    ):
        p = csub.add_parser(name, help=text)
        p.add_argument("--model", required=True, help="catalog id of a model downloaded on the head")
        p.add_argument("--json", action="store_true")
        if name in ("plan", "spawn"):
            p.add_argument("--pools", required=True, help="comma-separated pool names; the first is the head")
            p.add_argument("--head", help="the pool that holds the model and runs the coordinator (default: first)")
            p.add_argument("--ctx", type=int, default=2048, help="context size in tokens (default 2048)")
            p.add_argument("--spread", action="store_true", help="use every pool given (default: as few as fit)")
            p.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="share of free memory kept free")
        if name == "spawn":
            p.add_argument("--threads", type=int, help="threads of each ggml-rpc-server")
            p.add_argument("--verbose", action="store_true", help="llama-server -v: its log names each layer's node")
            p.add_argument("--stall", type=float, default=10.0, help="seconds without output that mean a dead link")
            p.add_argument("--no-restart", action="store_true", help="after a failure, do not restart")


def state_path(model: str) -> Path:
    """Where a running cluster of `model` is described."""
    return cfgmod.state_dir() / "clusters" / f"{check_id(model)}.json"


def _watcher_alive(doc: dict[str, Any]) -> bool:
    try:
        proc = psutil.Process(int(doc["watcher_pid"]))
        return abs(proc.create_time() - float(doc["watcher_started"])) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, KeyError, ValueError):
        return False


async def connect(cfg: cfgmod.Config, names: list[str], timeout: float = 30.0) -> dict[str, PoolClient]:
    """Pool clients for `names`, each connected or given up on after `timeout` (a lost pool is data, not an error)."""
    clients = {n: PoolClient(cfg.pool(n), max_backoff=5) for n in names}
    for c in clients.values():
        c.start()
    await asyncio.gather(*(c.first_outcome(timeout) for c in clients.values()))
    return clients


def _print(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc), flush=True)
        return
    event = doc.get("event")
    if event == "ready":
        print(f"✅ cluster {doc['model']} ready: {doc['url']} (coordinator on {doc['head']})", flush=True)
        for n in doc.get("nodes", []):
            print(
                f"  {n['pool']:<14} layers {n['layers'][0]}-{n['layers'][1]}{' + output' if n['output'] else ''}"
                f"  {n['share']:.0%} of the weights  {gb(n['memory_bytes'])} of {gb(n['free_bytes'])} free",
                flush=True,
            )
    else:
        print(f"{event}: {doc.get('reason') or doc.get('pool') or ''}", flush=True)


def _cluster(cfg: cfgmod.Config, clients: dict[str, PoolClient], args: argparse.Namespace, **kw: Any) -> Cluster:
    pools = [p.strip() for p in args.pools.split(",") if p.strip()]
    return Cluster(
        clients,
        check_id(args.model),
        pools,
        head=args.head,
        ctx=args.ctx,
        policy="spread" if args.spread else "fewest",
        margin=args.margin,
        **kw,
    )


async def _plan(cfg: cfgmod.Config, args: argparse.Namespace) -> int:
    names = [p.strip() for p in args.pools.split(",") if p.strip()]
    clients = await connect(cfg, names)
    try:
        cluster = _cluster(cfg, clients, args)
        placement = await cluster.plan()
        endpoints = [f"<{s.name} rpc>" for s in placement.shares]
        doc = {
            "model": cluster.model,
            "head": cluster.head,
            "policy": placement.policy,
            "ctx": placement.ctx,
            "needed_bytes": placement.needed_bytes,
            "nodes": describe_plan(placement),
            "left_out": list(placement.left_out),
            "args": cluster.coordinator_args(placement, endpoints),
        }
        if args.json:
            print(json.dumps(doc))
        else:
            print(placement.describe())
            print("llama-server " + " ".join(doc["args"]))
        return 0
    finally:
        await asyncio.gather(*(c.close() for c in clients.values()))


async def _spawn(cfg: cfgmod.Config, args: argparse.Namespace) -> int:
    path = state_path(args.model)
    with contextlib.suppress(FileNotFoundError, ValueError):
        if _watcher_alive(json.loads(path.read_text())):
            raise RbeeError(
                f"a cluster of {args.model} is running", f"see rbee-tui cluster status --model {args.model}"
            )
    names = [p.strip() for p in args.pools.split(",") if p.strip()]
    clients = await connect(cfg, names)
    me = psutil.Process()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    def save(cluster: Cluster) -> None:
        doc = {**cluster.describe(), "watcher_pid": me.pid, "watcher_started": me.create_time()}
        doc["pools"] = cluster.pools
        doc["events"] = cluster.events[-20:]
        files.atomic_write_json(path, doc)

    cluster: Cluster | None = None
    ready = False

    def on_event(doc: dict[str, Any]) -> None:
        if cluster is not None:
            save(cluster)
        if ready:
            _print(doc, args.json)

    try:
        cluster = _cluster(
            cfg,
            clients,
            args,
            threads=args.threads,
            verbose=args.verbose,
            stall_s=args.stall,
            restarts=0 if args.no_restart else 1,
            on_event=on_event,
        )
        spawn = asyncio.ensure_future(cluster.spawn())
        stop_wait = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({spawn, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if not spawn.done():  # interrupted while starting: what was started is stopped
            spawn.cancel()
            with contextlib.suppress(BaseException):
                await spawn
            return 130
        _print(spawn.result(), args.json)
        ready = True
        await cluster.watch(stopping)
        return 0 if stopping.is_set() else 1
    finally:
        if cluster is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(cluster.stop())
        path.unlink(missing_ok=True)
        await asyncio.gather(*(c.close() for c in clients.values()))


async def _stop_by_hand(cfg: cfgmod.Config, doc: dict[str, Any]) -> dict[str, Any]:
    """The watcher is gone: stop what it left, coordinator first."""
    clients = await connect(cfg, doc.get("pools", []))
    left: list[str] = []
    try:
        head = clients.get(doc["head"])
        coordinator = (doc.get("coordinator") or {}).get("id")
        if head is not None and coordinator:
            try:
                await head.stop_worker(coordinator)
            except RbeeError as exc:
                if "no worker" not in str(exc):
                    left.append(f"{doc['head']}: {exc}")
        for n in doc.get("nodes", []):
            client = clients.get(n["pool"])
            if client is None or client.view.state != CONNECTED:
                left.append(f"{n['pool']}: not reachable")
                continue
            try:
                await client.hive("rpc", "stop")
            except RbeeError as exc:
                left.append(f"{n['pool']}: {exc}")
    finally:
        await asyncio.gather(*(c.close() for c in clients.values()))
    return {"event": "stopped", "by": "stop", "left": left}


async def _stop(cfg: cfgmod.Config, args: argparse.Namespace) -> int:
    path = state_path(args.model)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise RbeeError(f"no cluster of {args.model} is running") from None
    if _watcher_alive(doc):
        os.kill(int(doc["watcher_pid"]), signal.SIGTERM)  # it stops the cluster in order, then exits
        deadline = time.monotonic() + STOP_WAIT_S
        while _watcher_alive(doc) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if _watcher_alive(doc):
            raise RbeeError(f"the cluster's watcher (pid {doc['watcher_pid']}) did not stop in {STOP_WAIT_S:.0f}s")
        out: dict[str, Any] = {"event": "stopped", "by": "watcher", "left": []}
    else:
        out = await _stop_by_hand(cfg, doc)
    path.unlink(missing_ok=True)
    if args.json:
        print(json.dumps(out))
    else:
        print("🛑 cluster stopped" + (f"; left: {'; '.join(out['left'])}" if out["left"] else ""))
    return 0 if not out["left"] else 1


def _status(args: argparse.Namespace) -> int:
    try:
        doc = json.loads(state_path(args.model).read_text())
    except FileNotFoundError:
        raise RbeeError(f"no cluster of {args.model} is running") from None
    doc["watcher_alive"] = _watcher_alive(doc)
    if not doc["watcher_alive"]:
        doc["state"] = "orphaned"
        doc["reason"] = "its watcher is gone: run rbee-tui cluster stop to clean up"
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"cluster {doc['model']}: {doc['state']} {doc.get('reason') or ''}".rstrip())
    print(f"  coordinator on {doc['head']}, reached at {doc.get('url', '-')}")
    for n in doc.get("nodes", []):
        print(
            f"  {n['pool']:<14} layers {n['layers'][0]}-{n['layers'][1]}{' + output' if n['output'] else ''}"
            f"  {n['share']:.0%}  {gb(n['memory_bytes'])} of {gb(n['free_bytes'])} free  rpc {n.get('endpoint')}"
        )
    return 0


def main(cfg: cfgmod.Config, args: argparse.Namespace) -> int:
    """Run one `cluster` action; the exit status."""
    if args.cluster_cmd == "status":
        return _status(args)
    action = {"plan": _plan, "spawn": _spawn, "stop": _stop}[args.cluster_cmd]
    try:
        return asyncio.run(action(cfg, args))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
