"""`rbee-tui capacity pack`: how many of these models fit on a pool, and how fast they are together."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from rbee_tui.catalog import human_size
from rbee_tui.config import Config
from rbee_tui.errors import RbeeError

MAX_REPEAT = 256  # `model*N`: more workers than this on one node is a typo


def add_parser(sub: Any) -> None:
    """The `capacity` command tree."""
    cap = sub.add_parser("capacity", help="packing: how many models fit on a pool, and their speed together")
    csub = cap.add_subparsers(dest="capacity_cmd", required=True, metavar="ACTION")
    pack = csub.add_parser("pack", help="start as many workers as fit, run them all at once, stop them")
    pack.add_argument("--pool", required=True, help="the pool to pack")
    pack.add_argument(
        "--models", required=True, help="model ids in the order to start them; MODEL*N repeats one (tiny-test*6,big)"
    )
    pack.add_argument("--max-tokens", type=int, help="tokens per request (default: [matrix] max_tokens, or 16)")
    pack.add_argument(
        "--seconds",
        type=float,
        default=0.0,
        help="keep every worker generating this long (default 0: "
        "one request each); sustained load is what shows throttling",
    )
    pack.add_argument("--run", type=int, help="store the result with this run (default: a new run)")
    pack.add_argument("--db", help="results database (default: $XDG_DATA_HOME/rbee/results.db)")
    pack.add_argument("--export", help="also write the run's exports: md,csv,json,html")
    pack.add_argument("--out", default=".", help="directory for the exports (default: here)")
    pack.add_argument("--json", action="store_true", help="print the result as JSON")


def parse_models(value: str) -> list[str]:
    """`a*3,b` -> [a, a, a, b], refusing an empty list or a bad repeat."""
    from rbee_tui.names import check_id

    out: list[str] = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        name, star, count = item.partition("*")
        if star and (not count.strip().isdigit() or not 1 <= int(count) <= MAX_REPEAT):
            raise RbeeError(f"--models: {item!r} repeats a model 1 to {MAX_REPEAT} times, e.g. tiny-test*4")
        out += [check_id(name.strip())] * (int(count) if star else 1)
    if not out:
        raise RbeeError("--models names no model", "e.g. --models tiny-test*4,qwen-0.5b")
    return out


def _gb(n: int | None) -> str:
    return "n/a" if n is None else human_size(n) if n else "0 B"


def report(result: dict[str, Any]) -> str:
    """The packing result as a few lines for a terminal."""
    lines = [
        f"pool {result['pool']}: budget {_gb(result['budget_bytes'])} for workers, predicted to fit "
        f"{result['predicted_count']} of {len(result['models'])}, started {result['started']}",
    ]
    if result["refused"]:
        lines.append(f"refused: {result['refused']}")
    lines.append(
        f"{'worker':<16}{'model':<20}{'alone':>10}{'together':>10}{'slowdown':>10}{'RSS':>12}{'predicted':>12}"
    )
    for w in result["workers"]:
        slow = w["alone_tps"] / w["together_tps"] if w["together_tps"] else 0.0
        lines.append(
            f"{w['worker']:<16}{w['model']:<20}{w['alone_tps']:>10.1f}{w['together_tps']:>10.1f}{slow:>9.2f}x"
            f"{_gb(w['rss_bytes']):>12}{_gb(w['predicted_bytes']):>12}"
        )
    temps = result["temps_peak_c"]
    lines.append(
        f"node: RAM used peak {_gb(result['ram_used_peak'])}, swap used peak {_gb(result['swap_used_peak'])}, "
        f"swapped in/out {_gb(result['swap_in_out_bytes'])}, hottest {f'{temps:.0f} °C' if temps else 'n/a'}"
    )
    freq = result["cpu_freq_mhz"]
    if freq:
        lines.append(f"CPU clock: {freq['idle']:.0f} MHz idle, {freq['min_load']:.0f} MHz lowest under load")
    for gpu, clocks in (result.get("gpu_clock_mhz") or {}).items():
        lines.append(
            f"GPU {gpu} SM clock: {clocks['idle']:.0f} MHz idle, {clocks['min_load']:.0f} MHz lowest under load"
        )
    lines.append(f"stopped {len(result['workers'])} worker(s); none left on {result['pool']}")
    return "\n".join(lines)


async def _pack(config: Config, args: argparse.Namespace, models: list[str], max_tokens: int) -> int:
    from rbee_tui.matrix.headless import ensure_out_dir, parse_formats
    from rbee_tui.matrix.packing import Packer
    from rbee_tui.pools.client import PoolClient

    pool = config.pool(args.pool)
    formats = parse_formats(args.export) if args.export else []
    if formats:
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):  # --json: stdout is the JSON
            ensure_out_dir(Path(args.out))
    db = Path(args.db) if args.db else None
    client = PoolClient(pool)
    client.start()
    try:
        await client.wait_connected(60)
        packer = Packer(client, models, max_tokens=max_tokens, seconds=args.seconds, on_note=_note(args.json))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, packer.cancel)
        result = await packer.run()
        run_id = await asyncio.to_thread(_store, db, args.run, pool.name, models, result)
        print(json.dumps({"run": run_id, **result}, indent=2) if args.json else report(result), flush=True)
        if formats:
            for path in await asyncio.to_thread(_export, db, run_id, formats, Path(args.out)):
                print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
        return 0
    finally:
        await client.close()


def _export(db: Path | None, run_id: int, formats: list[str], out: Path) -> list[Path]:
    """The run's exports, packing included (blocking: call it from a thread)."""
    from rbee_tui.matrix import export
    from rbee_tui.matrix.store import Store

    store = Store(db)
    try:
        return export.write(store.run(run_id), store.jobs(run_id), formats, out)
    finally:
        store.close()


def _note(quiet: bool) -> Any:
    def note(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    return note


def _store(db: Path | None, run_id: int | None, pool: str, models: list[str], result: dict[str, Any]) -> int:
    """Keep the result with `run_id`, or with a new run of its own; the run's id."""
    from rbee_tui.matrix.store import Store

    store = Store(db)
    try:
        if run_id is None:
            run_id = store.new_run({"source": "capacity pack", "pool": pool, "models": models})
            store.add_packing(run_id, result)
            store.finish_run(run_id)
        else:
            if not store.run(run_id):
                raise RbeeError(f"no run {run_id} in {store.path}", "leave out --run to store it with a new run")
            store.add_packing(run_id, result)
        return run_id
    finally:
        store.close()


def main(config: Config, args: argparse.Namespace) -> int:
    """Entry from the CLI."""
    models = parse_models(args.models)
    max_tokens = args.max_tokens if args.max_tokens is not None else config.matrix.max_tokens
    if max_tokens < 1:
        raise RbeeError(f"--max-tokens must be positive, got {max_tokens}")
    if args.seconds < 0:
        raise RbeeError(f"--seconds must be 0 or more, got {args.seconds}")
    try:
        return asyncio.run(_pack(config, args, models, max_tokens))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C: the packing stopped its workers first
        sys.stderr.write("interrupted\n")
        return 130
