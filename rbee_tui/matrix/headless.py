"""`rbee-tui matrix run`: the whole matrix without a screen, for scripts and CI (the seeds' test_all_models.sh)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from rbee_tui.config import Config
from rbee_tui.errors import RbeeError
from rbee_tui.matrix import export
from rbee_tui.matrix.plan import Cell, plan
from rbee_tui.matrix.scheduler import MatrixRunner
from rbee_tui.matrix.store import FINAL, Store
from rbee_tui.pools.client import CONNECTED, PoolClient


async def gather_plan(clients: dict[str, PoolClient], models: list[str] | None) -> tuple[list[str], list[Cell]]:
    """Connect, read every pool's catalog and status, and plan the cells."""
    await asyncio.gather(*(c.first_outcome(30) for c in clients.values()))
    info: dict[str, dict[str, Any]] = {}
    for name, c in clients.items():
        entry: dict[str, Any] = {
            "backends": list(c.pool.backends),
            "status": c.view.status,
            "catalog": {},
            "lost": "" if c.view.state == CONNECTED else (c.view.reason or c.view.state),
        }
        if not entry["lost"]:
            try:
                entry["catalog"] = await c.hive("models", "catalog")
            except RbeeError as exc:
                entry["lost"] = str(exc)
        info[name] = entry
    if not models:
        # By default, every model that some pool already has: a plain run works offline.
        models = list(
            dict.fromkeys(m["id"] for e in info.values() for m in e["catalog"].get("models", []) if m["downloaded"])
        )
    return models, plan(models, info)


def _line(done: int, total: int, job: dict[str, Any]) -> str:
    extra = ""
    if job["state"] == "passed":
        extra = f"  load {job['load_s']:.2f}s  ttft {job['ttft_ms']:.0f} ms  {job['avg_ts']:.1f} tok/s"
    elif job.get("reason"):
        extra = f"  {job['reason']}"
    return f"[{done:>3}/{total}] {job['state']:<10} {job['cell']}{extra}"


async def run(
    config: Config,
    pools: list[str] | None,
    models: list[str] | None,
    formats: list[str],
    out: Path,
    db: Path | None,
    max_tokens: int = 16,
) -> int:
    """Run the matrix, print a line per finished cell, write the exports; 0 only if no cell failed."""
    selected = [config.pool(p) for p in pools] if pools else list(config.pools)
    clients = {p.name: PoolClient(p) for p in selected}
    for c in clients.values():
        c.start()
    store = Store(db)
    try:
        models, cells = await gather_plan(clients, models)
        if not cells:
            raise RbeeError("nothing to test", "name models with --models, or download one first")
        keys = {}
        done = 0

        def progress(job: dict[str, Any]) -> None:
            nonlocal done
            if "cell" in job:
                keys[job["job_id"]] = job["cell"]
            if job["state"] in FINAL:
                done += 1
                print(_line(done, len(cells), {**job, "cell": keys.get(job["job_id"], "?")}), flush=True)

        runner = MatrixRunner(clients, store, max_tokens=max_tokens, on_change=progress)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, runner.cancel)
        print(f"matrix: {len(models)} model(s) x {len(clients)} pool(s): {len(cells)} cells", flush=True)
        run_id = await runner.run(cells, {"models": models, "pools": list(clients), "max_tokens": max_tokens})
        jobs = store.jobs(run_id)
        for path in export.write(store.run(run_id), jobs, formats, out):
            print(f"wrote {path}")
        counts = {s: sum(j["state"] == s for j in jobs) for s in ("passed", "failed", "skipped", "pool lost")}
        print("Passed: {passed}  Failed: {failed}  Skipped: {skipped}  Pool lost: {pool lost}".format(**counts))
        return 1 if counts["failed"] or runner.cancelled else 0
    finally:
        store.close()
        await asyncio.gather(*(c.close() for c in clients.values()), return_exceptions=True)


def export_run(db: Path | None, run_id: int | None, formats: list[str], out: Path) -> int:
    """Write the exports of a stored run (the latest by default)."""
    store = Store(db)
    try:
        runs = store.runs()
        if not runs:
            raise RbeeError(f"no runs in {store.path}")
        rid = run_id or runs[0]["id"]
        run_row = store.run(rid)
        if not run_row:
            raise RbeeError(f"no run {rid} in {store.path}")
        for path in export.write(run_row, store.jobs(rid), formats, out):
            print(f"wrote {path}")
        return 0
    finally:
        store.close()


def parse_formats(value: str) -> list[str]:
    """`md,csv` -> ['md', 'csv'], refusing unknown ones."""
    formats = [f.strip() for f in value.split(",") if f.strip()]
    bad = [f for f in formats if f not in export.FORMATS]
    if bad:
        raise RbeeError(f"unknown export format(s) {', '.join(bad)}", f"choose from {', '.join(export.FORMATS)}")
    return formats


def main_run(config: Config, args: Any) -> int:
    """Entry from the CLI."""
    formats = parse_formats(args.export)
    pools = [p for p in (args.pools or "").split(",") if p] or list(config.matrix.pools) or None
    models = [m for m in (args.models or "").split(",") if m] or list(config.matrix.models) or None
    try:
        return asyncio.run(
            run(config, pools, models, formats, Path(args.out), Path(args.db) if args.db else None, args.max_tokens)
        )
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
