"""The job board driven by Pilot: run all, watch cells change, open details, retry a failed cell, export."""

from __future__ import annotations

import json
from pathlib import Path

from textual.widgets import DataTable

from rbee_tui.app import RbeeApp
from rbee_tui.config import Config, PoolConfig
from rbee_tui.tinymodel import TinySpec, write_model
from rbee_tui.ui.screens.matrix import CellDetails, MatrixScreen
from tests.support import waiting

REGISTER_FLAKY = ("models", "register", "flaky", "--repo", "rbee-test/flaky", "--file", "flaky.gguf")


async def until(pilot, predicate, timeout: float = 60, what: str = "") -> float:
    return await waiting.until(predicate, timeout, what, sleep=pilot.pause)


def board_text(screen: MatrixScreen) -> dict[str, str]:
    table = screen.query_one("#board", DataTable)
    out = {}
    for r, model in enumerate(screen.models):
        for c, col in enumerate(screen.columns, start=1):
            out[f"{model}@{col}"] = str(table.get_cell_at((r, c)))
    return out


async def test_job_board(models_dir: Path, hive, isolated_home: Path, tmp_path: Path) -> None:
    # A second model whose file llama.cpp refuses: its cell fails, and is retried after being fixed.
    hive("models", "catalog", "--models-dir", str(models_dir), check=True)
    hive(
        *REGISTER_FLAKY,
        "--models-dir",
        str(models_dir),
        check=True,
    )
    bad = write_model(models_dir / "flaky" / "flaky.gguf", TinySpec(name="bad", arch="bogus-arch"))
    hive("models", "verify", "flaky", "--models-dir", str(models_dir), check=True)
    config = Config(pools=(PoolConfig(name="local", models_dir=str(models_dir), backends=("cpu", "cuda")),))
    app = RbeeApp(config, sample_interval=0.5)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.fleet.client("local").view.state == "connected", 30, "the pool")
        await pilot.press("m")
        screen = app.screen
        assert isinstance(screen, MatrixScreen)
        await until(pilot, lambda: len(screen.models) == 2, 30, "the plan")
        assert screen.columns == ["cpu@local", "cuda@local"]
        text = board_text(screen)
        assert "skipped" in text["tiny-test@cuda@local"]  # no CUDA here: planned as skipped
        seen: set[str] = set()

        def finished() -> bool:
            t = board_text(screen)
            seen.update(v.split(" ", 1)[1] for v in t.values())
            return app.fleet.matrix.counts()["done"] == 4 and not app.fleet.matrix.running

        await pilot.press("a")
        await until(pilot, finished, 120, "the run to finish")
        assert seen & {"spawning", "loading", "running", "verifying"}, "cells changed live"
        text = board_text(screen)
        assert "tok/s" in text["tiny-test@cpu@local"] and text["tiny-test@cpu@local"].startswith("✅")
        assert text["flaky@cpu@local"].startswith("❌")
        progress = str(screen.query_one("#matrix-progress").render())
        assert "4/4 done" in progress and "✅ 1" in progress and "❌ 1" in progress

        # Details of the failed cell: its reason, timeline and worker log.
        table = screen.query_one("#board", DataTable)
        await pilot.press("right")  # from the model names to the cpu column
        while table.cursor_row != screen.models.index("flaky"):
            await pilot.press("down")
        await pilot.press("i")
        await until(pilot, lambda: isinstance(app.screen, CellDetails), 10, "the details")
        details = str(app.screen.query_one("#cell-details").render())
        assert "bogus-arch" in details and "timeline:" in details and "worker log" in details
        await pilot.press("escape")

        # Fix the model and retry only what failed.
        write_model(bad, TinySpec(name="fixed", seed=5))
        hive(
            *REGISTER_FLAKY,
            "--replace",
            "--models-dir",
            str(models_dir),
            check=True,
        )  # a new file: forget the old checksum
        hive("models", "verify", "flaky", "--models-dir", str(models_dir), check=True)
        await pilot.press("f")
        await until(
            pilot,
            lambda: board_text(screen)["flaky@cpu@local"].startswith("✅") and not app.fleet.matrix.running,
            120,
            "the retry to pass",
        )
        cursor = table.cursor_coordinate
        # `a` again starts a new run of every cell: the store, the board, the details and the exports agree cell
        # by cell, and a cell's details compare it with the run before.
        board = app.fleet.matrix
        first_run = board.run_id
        await pilot.press("a")
        await until(pilot, lambda: board.run_id not in (None, first_run) and finished(), 120, "the new run to finish")
        assert table.cursor_coordinate == cursor, "the cursor stays where the user left it"
        jobs = {j["cell"]: j for j in board.store.jobs(board.run_id)}
        assert len(jobs) == 4
        for key, text in board_text(screen).items():
            assert board.state(key) == jobs[key]["state"], key
            assert text.startswith({"passed": "✅", "skipped": "⏭"}[jobs[key]["state"]]), (key, text)
        tps = jobs["tiny-test@cpu@local"]["measurements"]["avg_ts"]
        assert f"{tps:.1f} tok/s" in board_text(screen)["tiny-test@cpu@local"]
        # Enter on a cell runs just that cell, and its details show the new job with a worker log.
        key = f"flaky@{screen.columns[0]}"
        events_before = len(board.store.events(board.jobs[key].job_id))
        await pilot.press("enter")
        await until(
            pilot,
            lambda: len(board.store.events(board.jobs[key].job_id)) > events_before + 2 and finished(),
            120,
            "the cell to run again",
        )
        await pilot.press("i")
        await until(pilot, lambda: isinstance(app.screen, CellDetails), 10, "the details")
        details = str(app.screen.query_one("#cell-details").render())
        measurements = details.split("timeline:")[0]
        assert "passed" in details and "model loaded" in details  # the worker log of a passed cell too
        assert "vs last run" in details
        assert "None" not in measurements and " MB" in measurements and " s\n" in measurements  # human units
        await pilot.press("escape")
        await pilot.press("e")
        exports = isolated_home / "data" / "rbee" / "exports"
        await until(pilot, lambda: exports.exists() and any(exports.rglob("MODEL_SUPPORT.md")), 10, "the export")
        md = next(exports.rglob("MODEL_SUPPORT.md")).read_text()
        assert "| flaky |" in md and "queued" not in md and "**Total Tests:** 2 (2 not run)" in md
        data = json.loads(next(exports.rglob("*.json")).read_text())
        exported = {f"{r['model']}@{r['backend']}@{r['pool']}": r["status"] for r in data["results"]}
        assert exported == {k: j["state"] for k, j in jobs.items()}

        # One click on another cell runs that cell, once.
        key = f"tiny-test@{screen.columns[0]}"
        events_before = len(board.store.events(board.jobs[key].job_id))
        row, column = screen.models.index("tiny-test"), 1
        x = sum(c.get_render_width(table) for c in table.ordered_columns[:column]) + 2
        await pilot.click("#board", offset=(x, row + 1))
        await until(
            pilot,
            lambda: len(board.store.events(board.jobs[key].job_id)) > events_before + 2 and finished(),
            120,
            "the clicked cell to run",
        )
        assert table.cursor_coordinate == (row, column)
        assert not [n for n in app._notifications if "already going" in n.message]

        # Delete asks first, with the safe answer focused.
        await pilot.press("delete")
        await until(pilot, lambda: app.screen.__class__.__name__ == "ConfirmDialog", 10, "the question")
        await pilot.press("enter")
        assert app.fleet.matrix.jobs, "Enter kept the board"
        await pilot.press("delete")
        await until(pilot, lambda: app.screen.__class__.__name__ == "ConfirmDialog", 10, "the question")
        await pilot.click("#ok")
        await until(pilot, lambda: not app.fleet.matrix.jobs, 10, "the board to clear")
