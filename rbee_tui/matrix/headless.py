"""`rbee-tui matrix run|export|runs`: the matrix without a screen, for scripts and CI (the seeds'
test_all_models.sh)."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from rbee_tui.config import DEFAULT_CLUSTER_CTX, Config, cluster_spec, concurrency_levels, engine_names
from rbee_tui.errors import CorruptFileError, RbeeError
from rbee_tui.matrix import export
from rbee_tui.matrix.scheduler import MatrixRunner
from rbee_tui.matrix.store import FINAL, Store, default_path
from rbee_tui.matrix.survey import survey
from rbee_tui.matrix.sweep import with_engines
from rbee_tui.pools.client import PoolClient

SUMMARY = (
    ("passed", "Passed"),
    ("failed", "Failed"),
    ("skipped", "Skipped"),
    ("pool lost", "Pool lost"),
    ("cancelled", "Cancelled"),
)


def check_models_known(models: list[str], info: dict[str, dict[str, Any]]) -> None:
    """Refuse at once a model that no pool we could read has registered (a typo, most likely)."""
    checked = [name for name, e in info.items() if not e["lost"]]
    if not checked:
        return  # nothing could be read: the run says which pools are lost
    registered = {m["id"] for name in checked for m in info[name]["catalog"].get("models", [])}
    missing = [m for m in models if m not in registered]
    if missing:
        unchecked = [name for name in info if name not in checked]
        also = f"; could not check {', '.join(unchecked)}" if unchecked else ""
        raise RbeeError(
            f"model(s) {', '.join(missing)} registered on no selected pool (checked {', '.join(checked)}{also})",
            "see `rbee-tui pool NAME models catalog`, or register it with `rbee-tui pool NAME models register`",
        )


def shown_state(job: dict[str, Any]) -> str:
    """A cell's state as the lines and the summary say it (a cell planned on a lost pool is `pool lost`)."""
    if job["state"] == "skipped" and str(job.get("reason", "")).startswith("pool lost"):
        return "pool lost"
    return str(job["state"])


def _line(done: int, total: int, job: dict[str, Any]) -> str:
    extra = ""
    if job["state"] == "passed":
        extra = f"  load {job['load_s']:.2f}s  ttft {job['ttft_ms']:.0f} ms  {job['avg_ts']:.1f} tok/s"
        levels = job.get("concurrency") or []
        if levels:  # the sweep's ends: aggregate tokens/s at the lowest and the highest level
            extra += f"  sweep x{levels[0]['level']} {levels[0]['aggregate_tps']:.1f}"
            extra += f" -> x{levels[-1]['level']} {levels[-1]['aggregate_tps']:.1f} tok/s"
    elif job.get("reason"):
        extra = f"  {job['reason']}"
    return f"[{done:>3}/{total}] {shown_state(job):<10} {job['cell']}{extra}"


def ensure_out_dir(out: Path) -> None:
    """Create the exports' directory if it is missing, saying so; a path that cannot be one is a clear error."""
    if out.is_dir():
        return
    if out.exists():
        raise RbeeError(f"--out {out} is not a directory")
    try:
        out.mkdir(parents=True)
    except OSError as exc:
        raise RbeeError(f"cannot create --out directory {out}: {exc.strerror or exc}") from None
    print(f"created {out}")


def summary(jobs: list[dict[str, Any]]) -> tuple[dict[str, int], str]:
    """Counts by state, and the summary line: `Passed: N  Failed: N  Skipped: N  Pool lost: N  Cancelled: N`."""
    counts = {state: sum(shown_state(j) == state for j in jobs) for state, _ in SUMMARY}
    return counts, "  ".join(f"{label}: {counts[state]}" for state, label in SUMMARY)


async def run(
    config: Config,
    pools: list[str] | None,
    models: list[str] | None,
    formats: list[str],
    out: Path,
    db: Path | None,
    max_tokens: int = 16,
    clusters: list[tuple[str, ...]] | None = None,
    cluster_ctx: int = DEFAULT_CLUSTER_CTX,
    concurrency: tuple[int, ...] = (),
    engines: tuple[str, ...] = (),
) -> int:
    """Run the matrix, print a line per finished cell, write the exports; 0 only if cells ran and none failed.

    A run in which no cell could be tested (all skipped, or on lost pools) is an error, after its exports.
    `clusters` adds a column per cluster (`rpc@head+node+...`); their pools are connected even when `pools`
    leaves them out (they then get no cells of their own). `concurrency` sweeps every plain cell at those
    levels after its test; `engines` gives each pool a column per worker engine (`cpu`, `cpu/llama-server`).
    """
    clusters = clusters or []
    selected = [config.pool(p) for p in pools] if pools else list(config.pools)
    plain = {p.name for p in selected}
    for name in dict.fromkeys(n for c in clusters for n in c):
        if name not in plain:
            selected.append(config.pool(name))
    ensure_out_dir(out)
    await asyncio.to_thread(lambda: Store(db).close())  # a corrupt database is said before anything runs
    clients = {p.name: PoolClient(p) for p in selected}
    for c in clients.values():
        c.start()
    try:
        named = bool(models)
        models, cells, info = await survey(clients, models, clusters, plain)
        if named:
            check_models_known(models, info)
        cells = with_engines(cells, engines)
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

        # Its writes go through the runner's writer thread: a lock held by another process (a dashboard's run)
        # never stalls this loop, which keeps the pools' connections and metrics going.
        runner = MatrixRunner(
            clients, db, max_tokens=max_tokens, cluster_ctx=cluster_ctx, on_change=progress, concurrency=concurrency
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, runner.cancel)
        also = f" + {len(clusters)} cluster(s)" if clusters else ""
        print(f"matrix: {len(models)} model(s) x {len(plain)} pool(s){also}: {len(cells)} cells", flush=True)
        settings: dict[str, Any] = {"models": models, "pools": sorted(plain), "max_tokens": max_tokens}
        if clusters:
            settings.update(clusters=["+".join(c) for c in clusters], cluster_ctx=cluster_ctx)
        if concurrency:
            settings["concurrency"] = list(concurrency)
        if engines:
            settings["engines"] = list(engines)
        run_id = await runner.run(cells, settings)
        run_row, jobs = await asyncio.to_thread(_read_run, db, run_id)
        for path in export.write(run_row, jobs, formats, out):
            print(f"wrote {path}")
        counts, line = summary(jobs)
        print(line)
        if counts["failed"] or runner.cancelled:
            return 1
        if not counts["passed"]:
            raise RbeeError(f"no cell was tested: {counts['skipped']} skipped, {counts['pool lost']} on lost pools")
        return 0
    finally:
        await asyncio.gather(*(c.close() for c in clients.values()), return_exceptions=True)


def _read_run(db: Path | None, run_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A stored run's row and jobs (blocking: call it from a thread)."""
    store = Store(db)
    try:
        return store.run(run_id), store.jobs(run_id)
    finally:
        store.close()


def open_read_only(db: Path | None) -> Store:
    """The results database opened read-only, for the commands that only look.

    Store() would create a missing database and mark any run still going as interrupted, which is wrong while
    a dashboard is running one; this reuses Store's queries over a read-only connection instead.
    """
    path = Path(db or default_path())
    if not path.exists():
        raise RbeeError(f"no results database at {path}", "run a matrix first: rbee-tui matrix run")
    store = Store.__new__(Store)
    store.path = path
    try:
        store.db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)
        store.db.row_factory = sqlite3.Row
        store.db.execute("SELECT 1 FROM runs LIMIT 1").fetchall()
    except sqlite3.DatabaseError as exc:
        raise CorruptFileError(str(path), str(exc), "move it away to start a new results database") from None
    return store


def export_run(db: Path | None, run_id: int | None, formats: list[str], out: Path) -> int:
    """Write the exports of a stored run (the latest by default)."""
    store = open_read_only(db)
    try:
        runs = store.runs()
        if not runs:
            raise RbeeError(f"no runs in {store.path}")
        rid = run_id or runs[0]["id"]
        run_row = store.run(rid)
        if not run_row:
            raise RbeeError(f"no run {rid} in {store.path}", f"runs: {', '.join(str(r['id']) for r in runs[:20])}")
        ensure_out_dir(out)
        for path in export.write(run_row, store.jobs(rid), formats, out):
            print(f"wrote {path}")
        return 0
    finally:
        store.close()


def run_counts(store: Store) -> dict[int, dict[str, int]]:
    """Per run: how many cells, and how many in each state (one query, not every job of every run)."""
    out: dict[int, dict[str, int]] = {}
    for row in store.db.execute("SELECT run_id, state, COUNT(*) AS n FROM jobs GROUP BY run_id, state"):
        counts = out.setdefault(row["run_id"], {"cells": 0})
        counts["cells"] += row["n"]
        counts[row["state"]] = row["n"]
    return out


def list_runs(db: Path | None, as_json: bool) -> int:
    """Print the stored runs, newest first: id, started, state, cells, passed, failed."""
    store = open_read_only(db)
    try:
        counts = run_counts(store)
        rows = []
        for r in store.runs():
            c = counts.get(r["id"], {"cells": 0})
            rows.append(
                {
                    "id": r["id"],
                    "started_at": r["started_at"],
                    "finished_at": r["finished_at"],
                    "state": r["state"],
                    "cells": c["cells"],
                    **{state.replace(" ", "_"): c.get(state, 0) for state, _ in SUMMARY},
                }
            )
    finally:
        store.close()
    if as_json:
        print(json.dumps({"db": str(store.path), "runs": rows}, indent=2))
        return 0
    if not rows:
        print(f"no runs in {store.path}")
        return 0
    print(f"{'ID':>5}  {'Started':<19}  {'State':<12}{'Cells':>6}{'Passed':>8}{'Failed':>8}")
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started_at"]))
        print(f"{r['id']:>5}  {started:<19}  {r['state']:<12}{r['cells']:>6}{r['passed']:>8}{r['failed']:>8}")
    return 0


def parse_formats(value: str) -> list[str]:
    """`md,csv` -> ['md', 'csv'], refusing unknown ones."""
    formats = [f.strip() for f in value.split(",") if f.strip()]
    bad = [f for f in formats if f not in export.FORMATS]
    if bad:
        raise RbeeError(f"unknown export format(s) {', '.join(bad)}", f"choose from {', '.join(export.FORMATS)}")
    return formats


def parse_clusters(value: str | None, config: Config) -> list[tuple[str, ...]]:
    """`a+b+c,a+b` -> [(a, b, c), (a, b)], refusing a malformed cluster or a pool the config lacks."""
    known = [p.name for p in config.pools]
    try:
        return [cluster_spec(c, known) for c in (value or "").split(",") if c.strip()]
    except RbeeError as exc:
        raise RbeeError(f"--clusters: {exc.message}", exc.hint) from None


def main_run(config: Config, args: Any) -> int:
    """Entry from the CLI."""
    formats = parse_formats(args.export)
    pools = [p for p in (args.pools or "").split(",") if p] or list(config.matrix.pools) or None
    models = [m for m in (args.models or "").split(",") if m] or list(config.matrix.models) or None
    max_tokens = args.max_tokens if args.max_tokens is not None else config.matrix.max_tokens
    if max_tokens < 1:
        raise RbeeError(f"--max-tokens must be positive, got {max_tokens}")
    clusters = parse_clusters(getattr(args, "clusters", None), config) or list(config.matrix.clusters)
    ctx = getattr(args, "cluster_ctx", None)
    cluster_ctx = ctx if ctx is not None else config.matrix.cluster_ctx
    if cluster_ctx < 1:
        raise RbeeError(f"--cluster-ctx must be positive, got {cluster_ctx}")
    db = Path(args.db) if args.db else None
    given = getattr(args, "concurrency", None)
    sweep = concurrency_levels(given, "--concurrency") if given else config.matrix.concurrency
    given = getattr(args, "engines", None)
    engines = engine_names(given, "--engines") if given else config.matrix.engines
    try:
        return asyncio.run(
            run(
                config,
                pools,
                models,
                formats,
                Path(args.out),
                db,
                max_tokens,
                clusters,
                cluster_ctx,
                concurrency=sweep,
                engines=engines,
            )
        )
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
