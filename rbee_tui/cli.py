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
    mrun.add_argument("--max-tokens", type=int, default=16)
    mexp = msub.add_parser("export", help="write the tables of a stored run")
    mexp.add_argument("--run", type=int, help="run id (default: the latest)")
    mexp.add_argument("--export", default="md,csv,json,html")
    mexp.add_argument("--out", default=".")
    mexp.add_argument("--db")
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

    from rbee_tui.pools.hostkeys import known_hosts_path, server_key, trust

    pool = cfg.pool(name)
    if pool.transport != "ssh":
        raise RbeeError(f"pool {name} is local: it has no host key")
    key = asyncio.run(server_key(pool))
    print(f"{pool.host}:{pool.port} presents {key.get_algorithm()} key {key.get_fingerprint('sha256')}")
    if not yes and input("Trust it? [y/N] ").strip().lower() not in ("y", "yes"):
        print("not trusted")
        return 1
    asyncio.run(trust(pool))
    print(f"added to {known_hosts_path(pool)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rbee-tui`; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        cfg = cfgmod.load(args.config)
        if args.cmd == "config":
            if args.action == "path":
                print(cfg.path)
            elif args.action == "show":
                import tomli_w

                print(tomli_w.dumps(cfg.to_toml()), end="")
            else:
                if cfg.path and cfg.path.exists():
                    raise RbeeError(f"{cfg.path} already exists", "edit it, or remove it first")
                print(f"wrote {cfgmod.save(cfg, args.config)}")
            return 0
        if args.cmd == "pools":
            return _pools_status(cfg, args.json)
        if args.cmd == "pool":
            return _pool_passthrough(cfg, args.name, args.hive_args)
        if args.cmd == "trust":
            return _trust(cfg, args.name, args.yes)
        if args.cmd == "matrix":
            from pathlib import Path

            from rbee_tui.matrix import headless

            if args.matrix_cmd == "run":
                return headless.main_run(cfg, args)
            return headless.export_run(
                Path(args.db) if args.db else None, args.run, headless.parse_formats(args.export), Path(args.out)
            )
        from rbee_tui.app import RbeeApp

        RbeeApp(cfg).run()
        return 0
    except RbeeError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
