"""`rbee-hive`: the node agent's command line, and the `--json` protocol the dashboard speaks (docs/protocol.md)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee_tui import PROTOCOL, __version__
from rbee_tui import config as cfgmod
from rbee_tui.catalog import CatalogStore, ensure_not_tiny, human_size, new_entry, render_table
from rbee_tui.errors import Cancelled, RbeeError
from rbee_tui.names import check_id
from rbee_tui.units import duration

PROG = "rbee-hive"


@dataclass
class Context:
    """What every command needs: the pool's identity, its models dir, its catalog store, output mode."""

    pool_id: str
    models_dir: Path
    store: CatalogStore
    hub: str
    json: bool
    config: cfgmod.Config
    pool: cfgmod.PoolConfig | None


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _context(args: argparse.Namespace) -> Context:
    cfg = cfgmod.load(args.config)
    pool = cfg.pool(args.pool) if args.pool else next((p for p in cfg.pools if p.transport == "local"), None)
    models_dir = (
        args.models_dir
        or os.environ.get("RBEE_MODELS_DIR")
        or (pool.models_dir if pool else None)
        or cfgmod.default_models_dir()  # this user's own default: what a dashboard that names none expects
    )
    pool_id = check_id(args.pool_id or (pool.name if pool else "local"), "pool id")
    path = Path(models_dir).expanduser()
    store = CatalogStore(path, pool_id, cfg.registry.models)
    from rbee_tui.hive.hub import endpoint

    return Context(pool_id, path, store, endpoint(cfg.registry.endpoint), args.json, cfg, pool)


def cmd_catalog(ctx: Context, args: argparse.Namespace) -> int:
    catalog = ctx.store.load()
    if ctx.json:
        from rbee_tui.catalog import with_memory

        _emit(with_memory(catalog, ctx.models_dir))  # each downloaded model's predicted memory
    else:
        print(render_table(catalog))
    return 0


def cmd_list(ctx: Context, args: argparse.Namespace) -> int:
    catalog = ctx.store.load()
    models = [m for m in catalog.models if m.downloaded or args.all]
    if ctx.json:
        _emit(
            {
                "pool_id": catalog.pool_id,
                "models": [
                    {
                        "id": m.id,
                        "name": m.name,
                        "downloaded": m.downloaded,
                        "path": m.path,
                        "size_bytes": m.size_bytes,
                        "backends": list(m.backends),
                    }
                    for m in models
                ],
            }
        )
    else:
        if not models:
            print(f"No downloaded models in pool {catalog.pool_id} (see `{PROG} models catalog`).")
        for m in models:
            print(f"{m.id:<16}{human_size(m.size_bytes):<10}{m.path}")
    return 0


def cmd_register(ctx: Context, args: argparse.Namespace) -> int:
    ensure_not_tiny(args.id)
    entry = new_entry(
        ctx.models_dir,
        args.id,
        repo=args.repo,
        file=args.file,
        name=args.name,
        architecture=args.architecture,
        backends=args.backends.split(",") if args.backends else None,
        context_length=args.context_length,
        sha256=args.sha256,
    )
    with ctx.store.edit() as catalog:
        if catalog.find(args.id) is not None and not args.replace:
            raise RbeeError(f"model {args.id!r} is already registered", "use --replace to overwrite it")
        catalog.put(entry)
    if ctx.json:
        _emit({"registered": entry.to_json()})
    else:
        print(f"Registered {entry.id} ({entry.name}) from {args.repo}/{args.file}")
    return 0


def cmd_unregister(ctx: Context, args: argparse.Namespace) -> int:
    from rbee_tui.hive.downloads import unregister

    result = unregister(ctx.store, check_id(args.id), args.delete_files)
    if ctx.json:
        _emit(result)
    else:
        print(f"Unregistered {args.id}" + (" and deleted its files" if result["files_deleted"] else ""))
    return 0


def _progress_printer(ctx: Context) -> Callable[[Any], None]:
    if ctx.json:
        return lambda p: _emit(p.to_json())
    tty = sys.stderr.isatty()

    def show(p: Any) -> None:
        pct = 100.0 * p.bytes_done / p.bytes_total if p.bytes_total else 0.0
        eta = f"ETA {p.eta_s:.0f}s" if p.eta_s is not None else ""
        line = (
            f"{p.model}: {pct:5.1f}%  {human_size(p.bytes_done)} / {human_size(p.bytes_total)}  "
            f"{human_size(int(p.speed_bps))}/s  {eta}"
        )
        sys.stderr.write(("\r" + line.ljust(79)) if tty else line + "\n")
        sys.stderr.flush()

    return show


def cmd_download(ctx: Context, args: argparse.Namespace) -> int:
    from rbee_tui.hive.downloads import download

    model_id = check_id(args.id)
    cancel = threading.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = download(ctx.store, model_id, ctx.hub, _progress_printer(ctx), cancel)
        except BaseException as exc:
            outcome["error"] = exc

    def on_signal(signum: int, frame: Any) -> None:
        cancel.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    worker = threading.Thread(target=run, name=f"download:{model_id}", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if not ctx.json and sys.stderr.isatty():
        sys.stderr.write("\n")
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    if ctx.json:
        _emit(result)
    elif result.get("already_downloaded"):
        print(f"✅ Model {model_id} already downloaded ({result['path']})")
    else:
        print(f"✅ Model {model_id} downloaded: {human_size(result['size_bytes'])} at {result['path']}")
    return 0


def cmd_verify(ctx: Context, args: argparse.Namespace) -> int:
    from rbee_tui.hive.verify import verify

    result = verify(ctx.store, check_id(args.id))
    if ctx.json:
        _emit(result)
    elif result["ok"]:
        print(f"✅ {args.id}: {result['path']} is complete and checked")
    else:
        print(f"❌ {args.id}: " + "; ".join(result["problems"]))
    return 0 if result["ok"] else 1


def cmd_repair(ctx: Context, args: argparse.Namespace) -> int:
    kept = ctx.store.repair()
    result = {"catalog": str(ctx.store.path), "kept_aside": str(kept) if kept else None}
    if ctx.json:
        _emit(result)
    elif kept:
        print(f"The corrupt catalog was kept as {kept}; a fresh catalog was written to {ctx.store.path}")
    else:
        print(f"{ctx.store.path} is fine: nothing to repair")
    return 0


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    from rbee_tui.hive.status import node_status, render_status

    st = node_status(ctx.pool_id, str(ctx.models_dir))
    if ctx.json:
        _emit(st)
    else:
        print(render_status(st))
    return 0


def _registry(ctx: Context) -> Any:
    from rbee_tui.hive.records import Registry

    return Registry(ctx.pool_id)


def _worker_line(w: dict[str, Any]) -> str:
    state = w["state"]
    if state == "exited":
        how = f"signal {w['signal']}" if w.get("signal") else f"exit {w.get('exit_code')}"
        state = f"exited ({how})"
    rss = human_size(w["rss_bytes"]) if w.get("rss_bytes") else "-"
    return (
        f"{w['id']:<18}{w['model']:<14}{w['backend']:<8}{w['gpu']:<5}{w['port']:<7}{state:<20}"
        f"{duration(w.get('uptime_s')):>9}  {rss:<10}{w['engine']}"
    )


def _memory_limits(ctx: Context, args: argparse.Namespace) -> dict[str, int | None]:
    """The pool's memory_budget and reserve: the flags (the dashboard passes its config's), else this node's config."""
    out: dict[str, int | None] = {}
    for key in ("memory_budget", "reserve"):
        flag = getattr(args, key, None)
        out[key] = cfgmod.size_bytes(flag, f"--{key.replace('_', '-')}") if flag is not None else None
        if out[key] is None and ctx.pool is not None:
            out[key] = getattr(ctx.pool, key)
    return out


def cmd_worker_spawn(ctx: Context, args: argparse.Namespace) -> int:
    from rbee_tui.hive.records import describe
    from rbee_tui.hive.workers import spawn, wait_ready

    llama_server = args.llama_server or (ctx.pool.llama_server if ctx.pool else None)
    record = spawn(
        ctx.store,
        _registry(ctx),
        args.backend,
        args.model,
        gpu=args.gpu,
        port=args.port,
        host=args.host,
        engine=args.engine,
        n_ctx=args.n_ctx,
        llama_server=llama_server,
        kind=args.kind,
        server_args=tuple(shlex.split(args.server_args or "")),
        **_memory_limits(ctx, args),
    )
    if not ctx.json:
        print(
            f"🚀 Spawning worker {record.id}: {record.model} on {record.backend} (GPU {record.gpu}), "
            f"pid {record.pid}, log {record.log}"
        )
    if args.wait:
        t0 = time.monotonic()
        wait_ready(record, timeout=args.timeout)
        ready_s = time.monotonic() - t0
    out = describe(record)
    if args.wait:
        out["ready_after_s"] = round(ready_s, 3)
    if ctx.json:
        _emit(out)
    else:
        print(f"✅ Worker {record.id} {'ready' if args.wait else 'started'}: endpoint {record.url}")
    return 0


def cmd_worker_wait(ctx: Context, args: argparse.Namespace) -> int:
    from rbee_tui.hive.records import describe
    from rbee_tui.hive.workers import wait_ready

    record = _registry(ctx).find(check_id(args.worker_id, "worker id"))

    def cancel(signum: int, frame: Any) -> None:
        raise Cancelled(f"stopped waiting for worker {record.id}")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, cancel)
    # On the node, beside the worker: only its own /health is asked, never every worker's.
    wait_ready(record, timeout=args.timeout)
    out = describe(record)
    out["ready_after_s"] = round(time.time() - record.started_at, 3)
    if ctx.json:
        _emit(out)
    else:
        print(f"✅ Worker {record.id} ready: endpoint {record.url}")
    return 0


def cmd_worker_list(ctx: Context, args: argparse.Namespace) -> int:
    from rbee_tui.hive.records import describe

    workers = [describe(r) for r in _registry(ctx).read()]
    if ctx.json:
        _emit({"pool_id": ctx.pool_id, "workers": workers})
        return 0
    if not workers:
        print(f"No workers in pool {ctx.pool_id}.")
        return 0
    print(f"{'ID':<18}{'Model':<14}{'Backend':<8}{'GPU':<5}{'Port':<7}{'State':<20}{'Uptime':>9}  {'RSS':<10}Engine")
    for w in workers:
        print(_worker_line(w))
        if w["state"] == "exited" and w.get("reason"):
            print(f"    reason: {w['reason']}")
    return 0


def cmd_worker_stop(ctx: Context, args: argparse.Namespace) -> int:
    from rbee_tui.hive.workers import stop

    result = stop(_registry(ctx), args.worker_id, grace=args.grace)
    if ctx.json:
        _emit(result)
    else:
        print(f"🛑 Worker {args.worker_id} stopped" + (" (killed after the grace period)" if result["forced"] else ""))
    return 0


def cmd_worker_logs(ctx: Context, args: argparse.Namespace) -> int:
    from rbee_tui.hive.records import tail
    from rbee_tui.hive.workers import follow

    registry = _registry(ctx)
    try:
        record = registry.find(args.worker_id)
    except RbeeError:
        # A stopped worker is gone from the registry, but its log stays readable.
        log = registry.logs / f"{check_id(args.worker_id, 'worker id')}.log"
        if not log.exists():
            raise
        lines = tail(log, args.lines)
        if ctx.json:
            _emit({"worker_id": args.worker_id, "log": str(log), "lines": lines})
        else:
            print("\n".join(lines))
        return 0
    lines = follow(record) if args.follow else iter(tail(record.log, args.lines))
    if ctx.json and not args.follow:
        _emit({"worker_id": record.id, "log": record.log, "lines": list(lines)})
        return 0
    for line in lines:
        if ctx.json:
            _emit({"worker_id": record.id, "line": line})
        else:
            print(line, flush=True)
    return 0


def _rpc_registry(ctx: Context) -> Any:
    from rbee_tui.hive.rpc import RpcRegistry

    return RpcRegistry(ctx.pool_id)


def _rpc_line(server: dict[str, Any] | None) -> str:
    if server is None:
        return "no rpc-server on this node"
    if server["state"] == "exited":
        return f"rpc-server exited: {server.get('reason')}"
    mem = ", ".join(
        f"{d['name']} {human_size(d['free_bytes'])} free of {human_size(d['total_bytes'])}" for d in server["devices"]
    )
    busy = "busy (serving a coordinator)" if server["busy"] else "idle"
    return f"rpc-server on {server['endpoint']}, pid {server['worker_pid']}, {busy}, build {server['build']}; {mem}"


def cmd_rpc_start(ctx: Context, args: argparse.Namespace) -> int:
    from rbee_tui.hive import rpc

    pool = ctx.pool
    server = rpc.start(
        _rpc_registry(ctx),
        host=args.host or (pool.rpc_host if pool and pool.rpc_host else "127.0.0.1"),
        port=args.port,
        device=args.device,
        threads=args.threads,
        binary=args.rpc_server or (pool.rpc_server if pool else None),
        llama_server=args.llama_server or (pool.llama_server if pool else None),
        cache=not args.no_cache,
    )
    if ctx.json:
        _emit(server)
    else:
        print(_rpc_line(server))
    return 0


def cmd_rpc_status(ctx: Context, args: argparse.Namespace) -> int:
    from rbee_tui.hive import rpc

    pool = ctx.pool
    out = rpc.status(
        _rpc_registry(ctx),
        ctx.pool_id,
        binary=args.rpc_server or (pool.rpc_server if pool else None),
        llama_server=args.llama_server or (pool.llama_server if pool else None),
    )
    if ctx.json:
        _emit(out)
    else:
        print(_rpc_line(out["server"]))
    return 0


def cmd_rpc_stop(ctx: Context, args: argparse.Namespace) -> int:
    from rbee_tui.hive import rpc

    out = rpc.stop(_rpc_registry(ctx), grace=args.grace)
    if ctx.json:
        _emit(out)
    else:
        print("🛑 rpc-server stopped" if out["stopped"] else "no rpc-server was running")
    return 0


def cmd_rpc_shape(ctx: Context, args: argparse.Namespace) -> int:
    from rbee_tui.cluster.layers import read_shape, shape_to_json
    from rbee_tui.hive import rpc
    from rbee_tui.hive.status import node_status
    from rbee_tui.worker.upstream import find_llama_server

    entry = ctx.store.load().get(check_id(args.model))
    if not entry.downloaded or not Path(entry.path).is_file():
        raise RbeeError(f"Model {entry.id} not downloaded. Run: rbee-hive models download {entry.id}")
    server = find_llama_server(args.llama_server or (ctx.pool.llama_server if ctx.pool else None))
    out = {
        "pool_id": ctx.pool_id,
        "model": entry.id,
        "path": entry.path,
        "shape": shape_to_json(read_shape(Path(entry.path))),
        "llama_server": server,
        "build": rpc.build_of(server),
        "ram_available": node_status(ctx.pool_id, str(ctx.models_dir))["ram_available"],
    }
    if ctx.json:
        _emit(out)
    else:
        shape = out["shape"]
        print(f"{entry.id}: {shape['arch']}, {shape['n_layer']} layers, llama-server {server} (build {out['build']})")
    return 0


def cmd_metrics(ctx: Context, args: argparse.Namespace) -> int:
    from rbee_tui.hive.metrics import Sampler

    if args.interval <= 0:
        raise RbeeError("--interval must be positive")
    sampler = Sampler(ctx.pool_id)
    n = 0
    next_at = time.monotonic() + args.interval
    try:
        while args.count is None or n < args.count:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += args.interval
            s = sampler.sample()
            n += 1
            if ctx.json:
                _emit(s)
            else:
                gib = 1024**3
                ram = f"RAM {s['ram']['used'] / gib:5.1f}/{s['ram']['total'] / gib:.1f} GiB"
                print(
                    f"{ram}  CPU {s['cpu']['percent']:5.1f}%  load {s['load'][0]:.2f}  workers {len(s['workers'])}",
                    flush=True,
                )
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    return 0


def cmd_version(ctx: Context | None, args: argparse.Namespace) -> int:
    if args.json:
        _emit({"agent_version": __version__, "protocol": PROTOCOL})
    else:
        print(f"{PROG} {__version__}")
    return 0


def cmd_serve(ctx: Context | None, args: argparse.Namespace) -> int:
    from rbee_tui.hive.serve import serve

    # serve knows no command of its own: it runs each request through `main`, with the parser built once.
    return serve(build_parser(), main)


def cmd_setup(ctx: Context | None, args: argparse.Namespace) -> int:
    """`rbee-hive setup`: build (or find cached) the llama.cpp tools of this node's llama-cpp-python version."""
    from rbee_tui.hive import setup

    return setup.run(args.llama_version, args.cmake_args, args.expect, args.json)


def build_parser() -> argparse.ArgumentParser:
    """The whole `rbee-hive` command tree."""
    # SUPPRESS: these options are accepted before and after the subcommand; without it a subparser's default
    # would overwrite what was given before the subcommand.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", help="machine-readable output (docs/protocol.md)")
    common.add_argument("--config", help="config file (default: $RBEE_CONFIG or $XDG_CONFIG_HOME/rbee/config.toml)")
    common.add_argument("--pool", help="which [[pools]] entry of the config describes this node")
    common.add_argument("--models-dir", help="the pool's models dir (overrides the config and $RBEE_MODELS_DIR)")
    common.add_argument("--pool-id", help="the pool's name as the dashboard knows it")

    ap = argparse.ArgumentParser(
        prog=PROG, description="rbee node agent: models, workers and metrics of one pool.", parents=[common]
    )
    ap.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = ap.add_subparsers(dest="group", required=True, metavar="COMMAND")

    models = sub.add_parser("models", help="the model catalog and downloads", parents=[common])
    msub = models.add_subparsers(dest="cmd", required=True, metavar="ACTION")
    msub.add_parser("catalog", help="show the catalog", parents=[common]).set_defaults(fn=cmd_catalog)
    p = msub.add_parser("list", help="list downloaded models", parents=[common])
    p.add_argument("--all", action="store_true", help="include models not downloaded yet")
    p.set_defaults(fn=cmd_list)
    p = msub.add_parser("register", help="add a model to the catalog", parents=[common])
    p.add_argument("id")
    p.add_argument("--repo", required=True, help="Hugging Face repo, OWNER/NAME")
    p.add_argument("--file", required=True, help="the .gguf file in the repo (first part of a split model)")
    p.add_argument("--name")
    p.add_argument("--architecture")
    p.add_argument("--backends", help="comma-separated: cpu,cuda,metal")
    p.add_argument("--context-length", type=int)
    p.add_argument("--sha256")
    p.add_argument("--replace", action="store_true", help="overwrite an entry with the same id")
    p.set_defaults(fn=cmd_register)
    p = msub.add_parser("unregister", help="remove a model from the catalog", parents=[common])
    p.add_argument("id")
    p.add_argument("--delete-files", action="store_true", help="also delete its files")
    p.set_defaults(fn=cmd_unregister)
    p = msub.add_parser("download", help="download a model from the hub (resumes)", parents=[common])
    p.add_argument("id")
    p.set_defaults(fn=cmd_download)
    p = msub.add_parser("verify", help="re-check a model's files", parents=[common])
    p.add_argument("id")
    p.set_defaults(fn=cmd_verify)
    msub.add_parser("repair", help="keep a corrupt catalog aside and start afresh", parents=[common]).set_defaults(
        fn=cmd_repair
    )

    worker = sub.add_parser("worker", help="llama.cpp inference workers", parents=[common])
    wsub = worker.add_subparsers(dest="cmd", required=True, metavar="ACTION")
    p = wsub.add_parser("spawn", help="start a worker for a model", parents=[common])
    p.add_argument("backend", choices=["cpu", "cuda", "metal"])
    p.add_argument("--model", required=True, help="catalog id of a downloaded model")
    p.add_argument("--gpu", type=int, default=0, help="GPU index for cuda (default 0)")
    p.add_argument("--port", type=int, help="port (default 8000+gpu, or the next free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--engine", default="llama-cpp-python", choices=["llama-cpp-python", "llama-server"])
    p.add_argument("--llama-server", help="path of llama.cpp's llama-server (for --engine llama-server)")
    p.add_argument("--n-ctx", type=int, help="context size (default: the model's, at most 4096)")
    p.add_argument("--wait", action="store_true", help="return only once the worker answers ready")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits (default 300)")
    p.add_argument("--memory-budget", help="memory this pool's workers may use in all, e.g. 12GiB (docs/capacity.md)")
    p.add_argument("--reserve", help="memory to keep free on this node, e.g. 2GiB (default: a margin)")
    p.add_argument("--kind", default="worker", choices=["worker", "cluster"], help=argparse.SUPPRESS)
    # A cluster coordinator's llama-server arguments, one shell-quoted string: give it as --server-args=...
    p.add_argument("--server-args", help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_worker_spawn)
    p = wsub.add_parser("wait", help="wait until a spawned worker answers ready (or has died)", parents=[common])
    p.add_argument("worker_id")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
    p.set_defaults(fn=cmd_worker_wait)
    wsub.add_parser("list", help="workers and their state", parents=[common]).set_defaults(fn=cmd_worker_list)
    p = wsub.add_parser("stop", help="stop a worker (SIGTERM, then SIGKILL)", parents=[common])
    p.add_argument("worker_id")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL (default 10)")
    p.set_defaults(fn=cmd_worker_stop)
    p = wsub.add_parser("logs", help="a worker's log", parents=[common])
    p.add_argument("worker_id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the worker ends")
    p.add_argument("--lines", "-n", type=int, default=100)
    p.set_defaults(fn=cmd_worker_logs)

    rpcp = sub.add_parser("rpc", help="llama.cpp's ggml-rpc-server: this node's share of a cluster", parents=[common])
    rsub = rpcp.add_subparsers(dest="cmd", required=True, metavar="ACTION")
    p = rsub.add_parser("start", help="start ggml-rpc-server (loopback unless rpc_host is set)", parents=[common])
    p.add_argument("--port", type=int, help="port (default 50052, or the next free one)")
    p.add_argument("--host", help="address to listen on (default: the pool's rpc_host, else 127.0.0.1)")
    p.add_argument("--device", help="devices to expose, e.g. CPU or CUDA0 (default: its GPUs, else the CPU)")
    p.add_argument("--threads", type=int, help="CPU threads (default: half the hardware threads)")
    p.add_argument("--rpc-server", help="path of ggml-rpc-server (default: the pool's rpc_server, the build cache)")
    p.add_argument("--llama-server", help="path of llama-server: ggml-rpc-server is looked for beside it")
    p.add_argument("--no-cache", action="store_true", help="no local tensor cache (-c)")
    p.set_defaults(fn=cmd_rpc_start)
    p = rsub.add_parser("status", help="the rpc-server: port, devices, build, busy", parents=[common])
    p.add_argument("--rpc-server", help="path of ggml-rpc-server (for the build `start` would run)")
    p.add_argument("--llama-server", help="path of llama-server: ggml-rpc-server is looked for beside it")
    p.set_defaults(fn=cmd_rpc_status)
    p = rsub.add_parser("stop", help="stop the rpc-server (SIGTERM, then SIGKILL)", parents=[common])
    p.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL (default 5)")
    p.set_defaults(fn=cmd_rpc_stop)
    p = rsub.add_parser("shape", help="a model's layers and sizes, and the coordinator's build", parents=[common])
    p.add_argument("--model", required=True, help="catalog id of a downloaded model")
    p.add_argument("--llama-server", help="path of llama-server")
    p.set_defaults(fn=cmd_rpc_shape)

    from rbee_tui.hive import setup

    p = sub.add_parser(
        "setup", help="build llama.cpp's tools (llama-server, ggml-rpc-server) for this node, cached", parents=[common]
    )
    setup.add_arguments(p)
    p.set_defaults(fn=cmd_setup, no_context=True)

    p = sub.add_parser("metrics", help="stream node metrics, one sample per interval", parents=[common])
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    p.add_argument("--count", type=int, help="stop after this many samples (default: run until stopped)")
    p.set_defaults(fn=cmd_metrics)

    sub.add_parser("status", help="this node: host, RAM, GPUs, backends", parents=[common]).set_defaults(fn=cmd_status)
    sub.add_parser("version", help="agent and protocol version", parents=[common]).set_defaults(
        fn=cmd_version, no_context=True
    )
    sub.add_parser(
        "serve",
        help="answer JSON requests on stdin, one per line, until it ends (the dashboard's agent)",
        parents=[common],
    ).set_defaults(fn=cmd_serve, no_context=True)
    return ap


def _quiet_libraries() -> None:
    # huggingface_hub logs its own retries as warnings; our one-line errors say what matters.
    import logging

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Entry point of `rbee-hive`; returns the exit status. `serve` passes the parser it built once."""
    args = (parser or build_parser()).parse_args(argv)
    for name, default in (("json", False), ("config", None), ("pool", None), ("models_dir", None), ("pool_id", None)):
        if not hasattr(args, name):
            setattr(args, name, default)
    _quiet_libraries()
    try:
        ctx = None if getattr(args, "no_context", False) else _context(args)
        return args.fn(ctx, args)
    except RbeeError as exc:
        if args.json:
            _emit({"event": "cancelled" if isinstance(exc, Cancelled) else "error", **exc.to_json()})
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
