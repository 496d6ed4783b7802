"""The job board never waits on SQLite: another process holds the results database's write lock while the
dashboard runs a matrix; keys are still answered, and the run completes once the lock is released."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from rbee_tui.app import RbeeApp
from rbee_tui.config import Config, PoolConfig
from rbee_tui.matrix.store import Store
from rbee_tui.tinymodel import TinySpec, write_model
from rbee_tui.ui.screens.info import HelpScreen
from rbee_tui.ui.screens.matrix import CellDetails, MatrixScreen
from tests.support import waiting

HOLDER = """
import sys
from rbee_tui.matrix.store import Store
store = Store(sys.argv[1])  # another process's run (a headless `rbee-tui matrix run`) on the same results.db
print("open", flush=True)
sys.stdin.readline()
store.db.execute("BEGIN IMMEDIATE")  # and now in a long transaction: nobody else can write
print("locked", flush=True)
sys.stdin.readline()
store.db.execute("COMMIT")
"""
ANSWER_S = 5.0  # a key is answered well within this; a loop waiting on the lock would take up to 30 s


async def until(pilot, predicate, timeout: float = 60, what: str = "") -> float:
    return await waiting.until(predicate, timeout, what, sleep=pilot.pause)


async def answered(pilot, key: str, shown: type, what: str) -> float:
    """Press `key` and wait for the screen `shown`; return how long that took."""
    t0 = time.monotonic()
    await pilot.press(key)
    await until(pilot, lambda: isinstance(pilot.app.screen, shown), 30, what)
    return time.monotonic() - t0


async def test_keys_are_answered_while_another_process_holds_the_write_lock(
    models_dir: Path, hive, isolated_home: Path
) -> None:
    hive("models", "catalog", "--models-dir", str(models_dir), check=True)
    register = ("models", "register", "second", "--repo", "rbee-test/second", "--file", "second.gguf")
    hive(*register, "--models-dir", str(models_dir), check=True)
    write_model(models_dir / "second" / "second.gguf", TinySpec(name="second", seed=5))
    hive("models", "verify", "second", "--models-dir", str(models_dir), check=True)
    db = isolated_home / "data" / "rbee" / "results.db"  # the dashboard's own, under $XDG_DATA_HOME
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdin is not None and holder.stdout is not None
    assert holder.stdout.readline().strip() == "open"
    app = RbeeApp(Config(pools=(PoolConfig(name="local", models_dir=str(models_dir)),)), sample_interval=0.5)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: app.fleet.client("local").view.state == "connected", 30, "the pool")
            await pilot.press("m")
            screen = app.screen
            assert isinstance(screen, MatrixScreen)
            await until(pilot, lambda: len(screen.models) == 2, 30, "the plan")
            board = app.fleet.matrix
            await pilot.press("a")
            # Once the run has its jobs in the store, the other process takes the lock and keeps it.
            await until(pilot, lambda: board.jobs and all(j.job_id for j in board.jobs.values()), 30, "the run's jobs")
            holder.stdin.write("lock\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == "locked"
            reader = Store(db)

            # The run goes on, and the board shows it live: every cell ends while nothing can be written.
            await until(pilot, lambda: board.counts()["done"] == board.counts()["total"], 120, "every cell to end")
            assert board.counts()["passed"] == 2, board.jobs
            assert board.running, "the run ended before its results were written"
            assert reader.run(board.run_id)["state"] == "running"
            stored = {j["cell"]: j["state"] for j in reader.jobs(board.run_id)}
            assert stored != {k: j.state for k, j in board.jobs.items()}, "the store kept up: no lock was held"

            # Keys are answered: the details of a cell (read in a thread), the help, and back.
            await pilot.press("right")
            took = await answered(pilot, "i", CellDetails, "the details")
            assert took < ANSWER_S, f"the details took {took:.1f}s"
            assert "passed" in str(app.screen.query_one("#cell-details").render())
            took = await answered(pilot, "escape", MatrixScreen, "the board again")
            assert took < ANSWER_S, f"closing the details took {took:.1f}s"
            took = await answered(pilot, "question_mark", HelpScreen, "the help")
            assert took < ANSWER_S, f"the help took {took:.1f}s"
            await answered(pilot, "escape", MatrixScreen, "the board again")
            assert board.running and reader.run(board.run_id)["state"] == "running"

            # Released: the queued writes go in, and the run completes with every cell stored.
            holder.stdin.write("release\n")
            holder.stdin.flush()
            await until(pilot, lambda: not board.running, 60, "the run to complete")
            run = reader.run(board.run_id)
            assert run["state"] == "finished" and run["finished_at"]
            stored = {j["cell"]: j for j in reader.jobs(board.run_id)}
            assert set(stored) == set(board.jobs)
            for key, job in board.jobs.items():
                assert stored[key]["state"] == job.state == "passed", key
                assert stored[key]["measurements"]["avg_ts"] == job.measurements["avg_ts"]
                timeline = [e["state"] for e in reader.events(job.job_id)]
                assert timeline == ["queued", "spawning", "loading", "running", "verifying", "passed"], timeline
            reader.close()
    finally:
        holder.communicate("\n\n", timeout=30)
