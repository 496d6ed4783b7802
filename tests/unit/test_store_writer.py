"""The results writer: one thread owns the connection, callers never wait on SQLite's lock, writes land in order,
a failed write is said at the flush, and a process that dies keeps what was written (the run: interrupted)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from rbee_tui.matrix.plan import Cell
from rbee_tui.matrix.store import Store, StoreWriter
from tests.support.waiting import until

HOLDER = """
import sys
from rbee_tui.matrix.store import Store
store = Store(sys.argv[1])  # another process's run (a headless `rbee-tui matrix run`) in a long transaction
store.db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
store.db.execute("COMMIT")
"""


@contextmanager
def lock_held(db: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holds the database's write lock until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.communicate("\n", timeout=30)


async def test_writes_queue_behind_another_process_s_lock_and_land_in_order(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    writer = StoreWriter(db)
    run_id = await writer.call(Store.new_run, {"models": ["a", "b"]})
    a, b = await writer.call(Store.add_jobs, run_id, [Cell("a", "local", "cpu"), Cell("b", "local", "cpu")])
    reader = Store(db)
    with lock_held(db):
        t0 = time.monotonic()
        for state in ("spawning", "loading", "running", "passed"):
            writer.set_state(a, state, avg_ts=42.0)
        writer.set_state(b, "failed", "could not load", "the log tail")
        writer.submit(Store.finish_run, run_id)
        assert time.monotonic() - t0 < 0.1, "queueing a write waited on the lock"
        flushed = asyncio.ensure_future(writer.flush())
        # The loop is free meanwhile: it keeps ticking while the writes wait for the lock.
        ticks = 0
        while time.monotonic() - t0 < 1.0:
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks > 20 and not flushed.done()
        assert [j["state"] for j in reader.jobs(run_id)] == ["queued", "queued"]  # nothing written yet
    await asyncio.wait_for(flushed, 30)
    assert [e["state"] for e in reader.events(a)] == ["queued", "spawning", "loading", "running", "passed"]
    jobs = {j["model"]: j for j in reader.jobs(run_id)}
    assert jobs["a"]["measurements"] == {"avg_ts": 42.0}
    b_row = jobs["b"]
    assert (b_row["state"], b_row["reason"], b_row["log_tail"]) == ("failed", "could not load", "the log tail")
    assert reader.run(run_id)["state"] == "finished"
    writer.close()
    reader.close()


async def test_a_failed_write_is_raised_at_the_flush_and_takes_back_only_itself(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    writer = StoreWriter(db)
    run_id = await writer.call(Store.new_run, {})
    (a,) = await writer.call(Store.add_jobs, run_id, [Cell("a", "local", "cpu")])
    writer.set_state(a, "running")
    writer.set_state(a, "passed", bad=object())  # not JSON: this write fails
    writer.set_state(a, "failed", "after the bad one")
    with pytest.raises(TypeError, match="JSON serializable"):
        await writer.flush()
    writer.close()
    store = Store(db)
    assert [e["state"] for e in store.events(a)] == ["queued", "running", "failed"]
    assert store.jobs(run_id)[0]["reason"] == "after the bad one"
    store.close()


async def test_a_closed_writer_refuses_more_writes(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "r.db")
    await writer.call(Store.new_run, {})
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(Store.new_run, {})


DYING_RUN = """
import asyncio, os, sys
from rbee_tui.matrix.plan import Cell
from rbee_tui.matrix.store import Store, StoreWriter
from tests.support.waiting import until

async def main():
    writer = StoreWriter(sys.argv[1])
    run_id = await writer.call(Store.new_run, {})
    a, b = await writer.call(Store.add_jobs, run_id, [Cell("a", "local", "cpu"), Cell("b", "local", "cpu")])
    writer.set_state(a, "passed", avg_ts=42.0)
    writer.set_state(b, "running")
    await writer.flush()
    print(run_id, flush=True)
    os._exit(9)  # dies mid-run: no finish_run

asyncio.run(main())
"""


def test_a_run_that_dies_keeps_its_finished_cells_and_is_interrupted(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    proc = subprocess.run([sys.executable, "-c", DYING_RUN, str(db)], capture_output=True, text=True, timeout=60)
    run_id = int(proc.stdout.split()[0])
    store = Store(db)
    assert store.run(run_id)["state"] == "interrupted"
    jobs = {j["model"]: j for j in store.jobs(run_id)}
    assert jobs["a"]["state"] == "passed" and jobs["a"]["measurements"]["avg_ts"] == 42.0
    assert jobs["b"]["state"] == "interrupted"
    store.close()


FRESH_HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)  # a new file, not even in WAL mode yet
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
"""


async def test_a_database_locked_before_it_is_set_up_is_waited_for_not_called_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "r.db"
    connects = []
    real = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connects.append(args)
        return real(*args, **{**kwargs, "timeout": 0.1})  # a busy timeout that runs out while the lock is held

    monkeypatch.setattr(sqlite3, "connect", connect)
    proc = subprocess.Popen(
        [sys.executable, "-c", FRESH_HOLDER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        Store(db)  # busy, not corrupt
    writer = StoreWriter(db)
    run = asyncio.ensure_future(writer.call(Store.new_run, {}))
    await until(lambda: len(connects) >= 3 or run.done(), 30, "the writer to try again")
    assert not run.done(), run.exception()
    proc.communicate("\n", timeout=30)
    run_id = await asyncio.wait_for(run, 60)
    writer.close()
    store = Store(db)
    assert store.run(run_id)["state"] == "running"
    store.close()
