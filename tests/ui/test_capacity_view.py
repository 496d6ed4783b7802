"""The capacity view: opened by key from the dashboard and the job board, empty until something is measured, its
curves growing while a sweep runs (real local pool, tiny model, real workers), and snapshots from a stored run."""

from __future__ import annotations

import glob
import io
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from textual.widgets import DataTable, Input

from rbee_tui.app import RbeeApp
from rbee_tui.config import Config, MatrixConfig, PoolConfig, config_path
from rbee_tui.errors import RbeeError
from rbee_tui.matrix.capacity_data import Capacity, cell_capacity, parse_levels
from rbee_tui.matrix.plan import Cell
from rbee_tui.matrix.store import Store
from rbee_tui.ui.screens.capacity import CapacityScreen
from rbee_tui.ui.screens.matrix import ConcurrencyDialog, MatrixScreen
from rbee_tui.ui.widgets.capacity import CurvePlot, MemoryBars, PlotPanel
from tests.support import waiting

KEY = "tiny-test@cpu@local"


async def until(pilot, predicate, timeout: float = 30, what: str = "") -> float:
    return await waiting.until(predicate, timeout, what, sleep=pilot.pause)


async def type_text(pilot, text: str) -> None:
    await pilot.press(*[{",": "comma", " ": "space"}.get(c, c) for c in text])


def shown(screen: Any, selector: str) -> str:
    """The text a widget shows (a table too, as plain lines)."""
    widget = screen.query_one(selector)
    console = Console(width=widget.size.width or 120, record=True, file=io.StringIO())
    console.print(getattr(widget, "content", None) or widget.render())
    return console.export_text()


def level(n: int, aggregate: float, ttft: float, engine: str, parallel: int) -> dict[str, Any]:
    """One level of a sweep, in the shape the scheduler stores."""
    return {
        "level": n,
        "streams_ok": n,
        "aggregate_tps": aggregate,
        "per_stream_tps": round(aggregate / n, 2),
        "ttft_p50_ms": ttft,
        "ttft_p95_ms": ttft * 1.5,
        "engine": engine,
        "parallel": parallel,
    }


def packing(pool: str, models: list[str], together: float) -> dict[str, Any]:
    """A packing result in the shape the store keeps: every worker 20 tok/s alone, `together` with the rest."""
    workers = [
        {
            "model": m,
            "worker": f"worker-cpu-{i}",
            "alone_tps": 20.0,
            "together_tps": together,
            "rss_bytes": 43_000_000,
            "predicted_bytes": 40_000_000,
        }
        for i, m in enumerate(models)
    ]
    return {
        "pool": pool,
        "models": models,
        "budget_bytes": 300_000_000,
        "predicted_count": len(models),
        "started": len(models),
        "refused": "",
        "workers": workers,
        "ram_used_peak": 2_000_000_000,
        "swap_used_peak": 0,
        "swap_in_out_bytes": 0,
        "temps_peak_c": None,
        "cpu_freq_mhz": None,
        "gpu_clock_mhz": None,
    }


def stored_run() -> int:
    """A finished run in the results database, as a sweep on two pools leaves it: fixed numbers, no timing."""
    store = Store()
    try:
        run = store.new_run({"source": "test"})
        rows = [
            (
                Cell("qwen-0.5b", "gpu-box", "cuda"),
                {
                    "concurrency": [
                        level(1, 60.0, 80, "llama-server", 4),
                        level(2, 112.0, 90, "llama-server", 4),
                        level(4, 200.0, 110, "llama-server", 4),
                    ],
                    "predicted_bytes": 980_000_000,
                    "peak_rss": 410_000_000,
                    "peak_vram": 1_010_000_000,
                },
            ),
            (
                Cell("qwen-0.5b", "local", "cpu"),
                {
                    "concurrency": [
                        level(1, 21.0, 150, "llama-cpp-python", 1),
                        level(2, 21.4, 300, "llama-cpp-python", 1),
                        level(4, 21.6, 600, "llama-cpp-python", 1),
                    ],
                    "predicted_bytes": 700_000_000,
                    "peak_rss": 730_000_000,
                },
            ),
            (Cell("tiny-test", "local", "cpu"), {"predicted_bytes": 40_000_000, "peak_rss": 43_000_000}),
        ]
        for cell, measurements in rows:
            store.set_state(store.add_job(run, cell), "passed", **measurements)
        store.finish_run(run)
        # Packings are runs of their own (`capacity pack`): one measured step by step as workers were added, one
        # with its final state only, on a node that reads its clock and temperature (the clock dropped under load).
        three = packing("local", ["tiny-test"] * 3, 11.0)
        three["steps"] = [
            {"count": n, "workers": [{**w, "together_tps": tps} for w in three["workers"][:n]]}
            for n, tps in ((1, 19.0), (2, 14.0), (3, 11.0))
        ]
        six = packing("local", ["tiny-test"] * 6, 5.5)
        six.update(temps_peak_c=71.0, cpu_freq_mhz={"idle": 3400.0, "min_load": 2100.0})
        for result in (three, six):
            packing_run = store.new_run({"source": "capacity pack"})
            store.add_packing(packing_run, result)
            store.finish_run(packing_run)
        return run
    finally:
        store.close()


def staged() -> RbeeApp:
    return RbeeApp(Config(pools=(PoolConfig(name="local"),)), autostart=False)


async def open_view(pilot) -> CapacityScreen:
    await pilot.press("g")
    await until(pilot, lambda: isinstance(pilot.app.screen, CapacityScreen), 10, "the capacity view")
    screen = pilot.app.screen
    await until(pilot, lambda: screen.stored is not None, 10, "the stored results")
    await pilot.pause()
    return screen


# -- plain data --------------------------------------------------------------------------------------------------


def test_levels_typed_by_a_person() -> None:
    assert parse_levels(" 4, 1,2,2 ") == (1, 2, 4)
    assert parse_levels("") == ()
    for bad in ("1,x", "0", "1,-2", "1,1000"):
        with pytest.raises(RbeeError, match="whole number") as info:
            parse_levels(bad)
        assert "1,2,4,8" in str(info.value)  # the hint shows the form


def test_cell_capacity_reads_measurements() -> None:
    cell = cell_capacity(
        KEY,
        "passed",
        {
            "concurrency": [level(2, 30.0, 10, "llama-server", 2), level(1, 20.0, 5, "llama-server", 2), "junk"],
            "predicted_bytes": 100,
            "peak_rss": 90,
            "peak_vram": 20,
        },
    )
    assert cell is not None
    assert [lv.level for lv in cell.levels] == [1, 2]
    assert cell.gain == pytest.approx(1.5)
    assert (cell.predicted_bytes, cell.measured_bytes) == (100, 90)  # a CPU worker: its RSS, as the exports take it
    on_gpu = cell_capacity("m@cuda@box", "passed", {"predicted_bytes": 100, "peak_rss": 90, "peak_vram": 95})
    assert on_gpu is not None and on_gpu.measured_bytes == 95  # a GPU worker: its VRAM
    assert cell_capacity(KEY, "passed", {"avg_ts": 50.0}) is None  # nothing to draw
    # A state change alone is no new data: the view does not redraw for it.
    assert Capacity(1, False, (cell,)) == Capacity(1, False, (replace(cell, state="running"),))


# -- the view ----------------------------------------------------------------------------------------------------


async def test_no_data_says_what_to_do() -> None:
    app = staged()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_view(pilot)
        assert screen.capacity.run_id is None
        for tab, panel, words in (
            ("1", "#sweep-panel", "Run a sweep"),
            ("2", "#memory-panel", "Run the matrix"),
            ("3", "#packing-panel", "capacity pack"),
        ):
            await pilot.press(tab)
            await pilot.pause()
            assert screen.query_one(panel, PlotPanel).has_class("-empty")
            text = shown(screen.query_one(panel), ".plot-empty")
            assert words in text, text
            assert screen.query_one(panel).query_one(".plot-empty").region.height > 0, "the message is on screen"
        assert "no run with capacity data yet" in shown(screen, "#capacity-source")
        await pilot.press("question_mark")
        help_text = app.screen.query_one("Markdown").source
        assert "Concurrency" in help_text and "Packing" in help_text
        await pilot.press("escape", "escape")
        await until(pilot, lambda: app.screen is app.screen_stack[0], 10, "the dashboard again")


async def test_stored_run_is_drawn() -> None:
    run = stored_run()
    app = staged()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_view(pilot)
        assert screen.capacity.run_id == run and screen.capacity.stored
        aggregate = screen.query_one("#aggregate-plot", CurvePlot)
        assert aggregate.series == {
            "qwen-0.5b@cuda@gpu-box": [(1, 60.0), (2, 112.0), (4, 200.0)],
            "qwen-0.5b@cpu@local": [(1, 21.0), (2, 21.4), (4, 21.6)],
        }
        assert screen.query_one("#per-stream-plot", CurvePlot).series["qwen-0.5b@cuda@gpu-box"][-1] == (4, 50.0)
        note = shown(screen.query_one("#sweep-panel"), ".plot-note")
        assert "3.33x of 1" in note and "llama-server ×4" in note  # what batching buys, against itself at 1
        bars = screen.query_one("#memory-plot", MemoryBars).bars
        assert bars == [
            ("qwen-0.5b@cuda@gpu-box", 980_000_000, 1_010_000_000),
            ("qwen-0.5b@cpu@local", 700_000_000, 730_000_000),
            ("tiny-test", 40_000_000, 43_000_000),
        ]
        assert "qwen-0.5b@cuda@gpu-box" in aggregate.render().plain  # the legend is drawn
        # Packing: 20 tok/s alone; 19, 14, 11 with 1, 2, 3 on the pool (the steps of one packing), 5.5 with 6.
        slowdown = screen.query_one("#slowdown-plot", CurvePlot).series
        expected = [(1.0, 20 / 19), (2.0, 20 / 14), (3.0, 20 / 11), (6.0, 20 / 5.5)]
        assert slowdown == {"tiny-test@local": [(x, pytest.approx(y)) for x, y in expected]}
        assert not screen.query_one("#packing-panel", PlotPanel).has_class("-empty")
        note = shown(screen.query_one("#packing-panel"), ".plot-note")
        assert "6× tiny-test: 6 started (6 predicted)" in note and "71 °C, CPU clock 3400→2100 MHz" in note


# -- snapshots ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tab", ["1", "2", "3"], ids=["concurrency", "memory", "packing"])
def test_snapshot(snap_compare, tab: str) -> None:
    stored_run()

    async def before(pilot) -> None:
        await open_view(pilot)
        await pilot.press(tab)
        await pilot.pause(0.3)

    assert snap_compare(staged(), terminal_size=(80, 24), run_before=before)


def test_snapshot_empty(snap_compare) -> None:
    async def before(pilot) -> None:
        await open_view(pilot)
        await pilot.pause(0.3)

    assert snap_compare(staged(), terminal_size=(80, 24), run_before=before)


# -- live: the sweep from the board, watched in the view -----------------------------------------------------------


async def test_sweep_from_the_board_grows_the_curves(models_dir: Path, hive, monkeypatch: pytest.MonkeyPatch) -> None:
    hive("models", "catalog", "--models-dir", str(models_dir), check=True)  # tiny-test, generated
    config = Config(pools=(PoolConfig(name="local", models_dir=str(models_dir)),), matrix=MatrixConfig(max_tokens=48))
    app = RbeeApp(config, sample_interval=0.5)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.fleet.client("local").view.state == "connected", 30, "the pool")
        await pilot.press("m")
        board = app.screen
        assert isinstance(board, MatrixScreen)
        await until(pilot, lambda: board.models == ["tiny-test"], 30, "the plan")

        # n: the levels, checked before the dialog closes, saved in the config file.
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, ConcurrencyDialog), 10, "the dialog")
        await type_text(pilot, "1,x")
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ConcurrencyDialog), "a bad level keeps the dialog open"
        assert "whole number" in shown(app.screen, "#dialog-error")
        assert app.screen.focused is app.screen.query_one("#concurrency-levels", Input)
        await pilot.press("backspace", "backspace")
        await type_text(pilot, ",2")
        await pilot.press("enter")
        await until(pilot, lambda: app.fleet.matrix.concurrency == (1, 2), 10, "the levels saved")
        assert "concurrency = [1, 2]" in config_path().read_text()
        await until(pilot, lambda: "sweep 1,2" in shown(board, "#matrix-progress"), 10, "the board to say so")

        # Run the cell and open the capacity view at once; every draw of the view is recorded with whether the
        # run was still going.
        draws: list[tuple[tuple[float, ...], bool]] = []
        original = CapacityScreen.draw

        def draw(view: CapacityScreen, cap: Capacity) -> None:
            original(view, cap)
            series = view.query_one("#aggregate-plot", CurvePlot).series
            draws.append((tuple(x for x, _ in series.get(KEY, [])), app.fleet.matrix.running))

        monkeypatch.setattr(CapacityScreen, "draw", draw)
        table = board.query_one("#board", DataTable)
        await pilot.press("right")
        assert table.cursor_coordinate == (0, 1)
        await pilot.press("enter", "g")
        await until(pilot, lambda: isinstance(app.screen, CapacityScreen), 10, "the capacity view")
        view = app.screen
        plot = view.query_one("#aggregate-plot", CurvePlot)
        await until(pilot, lambda: not app.fleet.matrix.running, 180, "the run to finish")
        assert app.fleet.matrix.state(KEY) == "passed", app.fleet.matrix.jobs[KEY]

        # The curve grew level by level while the run went on, and ends with both levels.
        assert ((1,), True) in draws, draws
        assert plot.series[KEY][0][0] == 1 and [x for x, _ in plot.series[KEY]] == [1, 2]
        stored = app.fleet.matrix.store.jobs(app.fleet.matrix.run_id)[0]["measurements"]["concurrency"]
        assert [(lv["level"], lv["aggregate_tps"]) for lv in stored] == plot.series[KEY]
        assert all(lv["streams_ok"] == lv["level"] for lv in stored), "every stream completed with tokens"
        assert KEY in plot.render().plain and view.capacity.run_id == app.fleet.matrix.run_id

        # Back on the board, the cell shows what happened while the view covered it.
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is board, 10, "the board again")
        assert str(table.get_cell_at((0, 1))).startswith("✅")


def _llama_server() -> str | None:
    env = os.environ.get("RBEE_LLAMA_SERVER")
    if env:
        return env
    found = sorted(glob.glob(str(Path.home() / ".cache/rbee/llama.cpp/*/bin/llama-server")))
    return found[-1] if found else None


@pytest.mark.skipif(_llama_server() is None, reason="llama-server is not built: scripts/build-llama-cpp.sh builds it")
async def test_both_engines_side_by_side(models_dir: Path, hive, monkeypatch: pytest.MonkeyPatch) -> None:
    # The embedded engine serialises, llama-server --parallel 4 batches: one board, a column each, one view.
    monkeypatch.setenv("RBEE_LLAMA_SERVER", str(_llama_server()))
    hive("models", "catalog", "--models-dir", str(models_dir), check=True)
    matrix = MatrixConfig(max_tokens=32, concurrency=(1, 2, 4), engines=("llama-cpp-python", "llama-server"))
    config = Config(pools=(PoolConfig(name="local", models_dir=str(models_dir)),), matrix=matrix)
    app = RbeeApp(config, sample_interval=0.5)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.fleet.client("local").view.state == "connected", 30, "the pool")
        await pilot.press("m")
        board = app.screen
        assert isinstance(board, MatrixScreen)
        await until(pilot, lambda: board.columns == ["cpu@local", "cpu/llama-server@local"], 30, "a column per engine")
        await pilot.press("a", "g")
        await until(pilot, lambda: isinstance(app.screen, CapacityScreen), 10, "the capacity view")
        view = app.screen
        await until(pilot, lambda: app.fleet.matrix.counts()["done"] == 2, 240, "both cells")
        assert {app.fleet.matrix.state(k) for k in app.fleet.matrix.jobs} == {"passed"}, app.fleet.matrix.jobs
        series = view.query_one("#aggregate-plot", CurvePlot).series
        batching = "tiny-test@cpu/llama-server@local"
        assert set(series) == {KEY, batching}
        assert all([x for x, _ in points] == [1, 2, 4] for points in series.values()), series
        cells = {c.key: c for c in view.capacity.swept}
        assert all(lv.streams_ok == lv.level for c in cells.values() for lv in c.levels), "every stream had tokens"
        assert cells[batching].levels[-1].parallel == 4 and cells[KEY].levels[-1].parallel == 1
        # What batching buys, each engine against itself at 1 stream: in the note, no speed asserted.
        note = shown(view.query_one("#sweep-panel"), ".plot-note")
        assert f"{cells[batching].gain:.2f}x of 1" in note and "llama-server ×4" in note, note
