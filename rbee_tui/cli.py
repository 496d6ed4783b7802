"""`rbee-tui`: the dashboard, and headless subcommands for scripts."""

from __future__ import annotations

import argparse
import sys

from rbee_tui import __version__
from rbee_tui import config as cfgmod
from rbee_tui.errors import RbeeError

PROG = "rbee-tui"


def build_parser() -> argparse.ArgumentParser:
    """The `rbee-tui` command tree."""
    ap = argparse.ArgumentParser(prog=PROG, description="Dashboard for a home lab of LLM inference machines.")
    ap.add_argument("--config", help="config file (default: $RBEE_CONFIG or $XDG_CONFIG_HOME/rbee/config.toml)")
    ap.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    cfg = sub.add_parser("config", help="show or create the config file")
    cfg.add_argument("action", choices=["path", "show", "init"])
    pools = sub.add_parser("pools", help="all pools at once")
    pools.add_argument("action", choices=["status"])
    pools.add_argument("--json", action="store_true")
    pool = sub.add_parser("pool", help="run rbee-hive commands on one pool (as `rbee-hive` would there)")
    pool.add_argument("name")
    pool.add_argument("hive_args", nargs=argparse.REMAINDER, metavar="models|worker|status|metrics ...")
    matrix = sub.add_parser("matrix", help="the multi-model test matrix, headless")
    msub = matrix.add_subparsers(dest="matrix_cmd", required=True, metavar="ACTION")
    mrun = msub.add_parser("run", help="test every model on every pool and backend")
    mrun.add_argument("--pools", help="comma-separated pool names (default: all)")
    mrun.add_argument("--models", help="comma-separated model ids (default: those downloaded somewhere)")
    mrun.add_argument("--export", default="md", help="formats to write: md,csv,json,html (default md)")
    mrun.add_argument("--out", default=".", help="directory for the exports (default: here)")
    mrun.add_argument("--db", help="results database (default: $XDG_DATA_HOME/rbee/results.db)")
    mrun.add_argument("--max-tokens", type=int, help="tokens per test prompt (default: [matrix] max_tokens, or 16)")
    mrun.add_argument("--clusters", help="cluster columns: pools joined by '+', comma-separated (a+b+c,a+b)")
    mrun.add_argument("--cluster-ctx", type=int, help="context of the cluster columns (default: [matrix], or 2048)")
    mrun.add_argument("--concurrency", help="sweep each cell at these simultaneous streams, e.g. 1,2,4,8")
    mrun.add_argument("--engines", help="worker engines per pool: llama-cpp-python,llama-server (default: the first)")
    mexp = msub.add_parser("export", help="write the tables of a stored run")
    mexp.add_argument("--run", type=int, help="run id (default: the latest)")
    mexp.add_argument("--export", default="md,csv,json,html")
    mexp.add_argument("--out", default=".")
    mexp.add_argument("--db")
    mruns = msub.add_parser("runs", help="list the stored runs")
    mruns.add_argument("--db", help="results database (default: $XDG_DATA_HOME/rbee/results.db)")
    mruns.add_argument("--json", action="store_true")
    from rbee_tui.cluster.headless import add_parser as add_cluster

    add_cluster(sub)
    from rbee_tui.capacity_cli import add_parser as add_capacity

    add_capacity(sub)
    from rbee_tui.gateway.headless import add_parser as add_gateway

    add_gateway(sub)
    trust = sub.add_parser("trust", help="accept a pool's SSH host key after checking its fingerprint")
    trust.add_argument("name")
    trust.add_argument("--yes", action="store_true", help="do not ask")
    return ap


def _pools_status(cfg: cfgmod.Config, as_json: bool) -> int:
    import asyncio
    import json

    from rbee_tui.pools.client import gather_pools_config, probe

    results = asyncio.run(gather_pools_config(cfg.pools, probe))
    rows = []
    for pool, res in zip(cfg.pools, results, strict=True):
        if isinstance(res, BaseException):
            res = {"name": pool.name, "transport": pool.transport, "state": "lost", "reason": str(res)}
        rows.append(res)
    if as_json:
        print(json.dumps({"pools": rows}, indent=2))
    else:
        gib = 1024**3
        for r in rows:
            line = f"{r['name']:<16}{r['transport']:<7}{r['state']:<13}"
            if r["state"] == "connected":
                st = r["status"]
                gpus = ", ".join(g["name"] for g in st.get("gpus", [])) or "no GPU"
                line += (
                    f"{st['hostname']}  {st['cpu_count']} CPUs  {st['ram_available'] / gib:.1f}/"
                    f"{st['ram_total'] / gib:.1f} GiB free  {gpus}  {len(r['workers'])} worker(s)"
                )
            else:
                line += r["reason"]
            print(line)
    return 0 if all(r["state"] == "connected" for r in rows) else 1


def _pool_passthrough(cfg: cfgmod.Config, name: str, args: list[str]) -> int:
    import asyncio

    from rbee_tui.pools.client import passthrough

    if not args:
        raise RbeeError("nothing to run", f"e.g. rbee-tui pool {name} models catalog")
    rc, out, err = asyncio.run(passthrough(cfg.pool(name), args))
    sys.stdout.write(out)
    sys.stderr.write(err)
    return rc


def _trust(cfg: cfgmod.Config, name: str, yes: bool) -> int:
    import asyncio

    from rbee_tui.pools.hostkeys import fingerprint, known_hosts_path, server_key, write_key

    pool = cfg.pool(name)
    if pool.transport != "ssh":
        raise RbeeError(f"pool {name} is local: it has no host key")
    # One connection: the key written is the very key shown, so nothing can slip in between.
    key = asyncio.run(server_key(pool))
    print(f"{pool.host}:{pool.port} presents {key.get_algorithm()} key {fingerprint(key)}", flush=True)
    if not yes:
        try:
            answer = input("Trust it? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("not trusted")
            return 1
    write_key(pool, key)
    print(f"added to {known_hosts_path(pool)}")
    return 0


def _config_show(cfg: cfgmod.Config) -> None:
    import tomli_w

    if cfg.path and cfg.path.exists():
        print(f"# read from {cfg.path}")
    else:
        print(f"# no config file at {cfg.path}: these are the defaults")
    print(tomli_w.dumps(cfg.to_toml()), end="")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rbee-tui`; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        cfg = cfgmod.load(args.config)
        for warning in cfg.warnings:
            sys.stderr.write(f"{PROG}: warning: {warning}\n")
        if args.cmd == "config":
            if args.action == "path":
                print(cfg.path)
            elif args.action == "show":
                _config_show(cfg)
            else:
                if cfg.path and cfg.path.exists():
                    raise RbeeError(f"{cfg.path} already exists", "edit it, or remove it first")
                print(f"wrote {cfgmod.save(cfg, args.config)}")
            return 0
        if args.cmd == "pools":
            return _pools_status(cfg, args.json)
        if args.cmd == "pool":
            return _pool_passthrough(cfg, args.name, args.hive_args)
        if args.cmd == "cluster":
            from rbee_tui.cluster import headless as cluster

            return cluster.main(cfg, args)
        if args.cmd == "capacity":
            from rbee_tui import capacity_cli

            return capacity_cli.main(cfg, args)
        if args.cmd == "gateway":
            from rbee_tui.gateway import headless as gateway

            return gateway.main(cfg, args)
        if args.cmd == "trust":
            return _trust(cfg, args.name, args.yes)
        if args.cmd == "matrix":
            from pathlib import Path

            from rbee_tui.matrix import headless

            db = Path(args.db) if args.db else None
            if args.matrix_cmd == "run":
                return headless.main_run(cfg, args)
            if args.matrix_cmd == "runs":
                return headless.list_runs(db, args.json)
            return headless.export_run(db, args.run, headless.parse_formats(args.export), Path(args.out))
        from rbee_tui.app import RbeeApp

        app = RbeeApp(cfg)
        app.run()
        # A crash inside the app ends it with its traceback on stderr and return code 1: say so to the shell.
        return app.return_code or 0
    except RbeeError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
