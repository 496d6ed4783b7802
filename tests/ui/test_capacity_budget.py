"""The memory model in the dashboard: the catalog shows each model's predicted memory, and the spawn dialog says
what will not fit, with both numbers, before anything starts; on the real local pool, driven by keys."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from textual.widgets import Button, DataTable, Static

from rbee_tui.app import RbeeApp
from rbee_tui.capacity import MemoryPrediction
from rbee_tui.catalog import human_size
from rbee_tui.config import Config, PoolConfig
from rbee_tui.ui.screens.dialogs import SpawnDialog
from rbee_tui.ui.widgets.catalog import COLUMNS
from tests.support import waiting

MEMORY = COLUMNS.index("Memory")


async def until(pilot: Any, predicate: Callable[[], Any], timeout: float = 30, what: str = "") -> float:
    return await waiting.until(predicate, timeout, what, sleep=pilot.pause)


def cells(app: RbeeApp, column: int) -> dict[str, str]:
    table = app.screen_stack[0].query_one("#catalog", DataTable)
    return {str(table.get_row_at(i)[0]): str(table.get_row_at(i)[column]) for i in range(table.row_count)}


def text(app: RbeeApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


def app_for(models_dir: Path, budget: int | None = None) -> RbeeApp:
    pool = PoolConfig(name="local", models_dir=str(models_dir), memory_budget=budget)
    return RbeeApp(Config(pools=(pool,)), sample_interval=0.5)


def tiny_memory(hive: Callable[..., Any], models_dir: Path) -> dict[str, Any]:
    doc = json.loads(hive("models", "catalog", "--models-dir", str(models_dir), "--json", check=True).stdout)
    return next(m for m in doc["models"] if m["id"] == "tiny-test")["memory"]


async def test_the_catalog_shows_each_models_predicted_memory(models_dir: Path, hive: Callable[..., Any]) -> None:
    memory = tiny_memory(hive, models_dir)
    app = app_for(models_dir)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: "tiny-test" in cells(app, 0), what="the catalog")
        shown = cells(app, MEMORY)
        assert shown["tiny-test"] == human_size(memory["total"])
        assert shown["qwen-0.5b"] == "-"  # not downloaded: no file to read its shape from
        # In view at 120 columns, beside the size.
        assert f" {human_size(memory['total'])} " in "".join(
            strip.text for strip in app.screen._compositor.render_strips()
        )
        await pilot.press("q")


async def test_a_spawn_over_the_budget_is_refused_in_the_dialog_with_numbers(
    models_dir: Path, hive: Callable[..., Any], isolated_home: Path
) -> None:
    memory = tiny_memory(hive, models_dir)
    started = time.time()
    app = app_for(models_dir, budget=20_000_000)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: cells(app, 0).get("tiny-test") is not None, what="the catalog")
        await until(pilot, lambda: app.fleet.client("local").view.last_sample is not None, what="a sample")
        await pilot.press("3", "s")
        await until(pilot, lambda: isinstance(app.screen, SpawnDialog), 10, "the spawn dialog")
        await pilot.pause(0.2)
        error = text(app, "#dialog-error")
        assert error == f"tiny-test needs {memory['total'] / 1e6:.0f} MB, 20 MB free on local.", error
        assert app.screen.query_one("#ok", Button).disabled
        prediction = MemoryPrediction.from_json(memory).describe()
        assert text(app, "#spawn-memory") == f"Predicted: {prediction}; 20 MB free for workers on local"
        # A click on the disabled button starts nothing.
        await pilot.click("#ok")
        await pilot.pause(0.3)
        assert isinstance(app.screen, SpawnDialog)
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, SpawnDialog), 10, "the dialog to close")
        assert app.fleet.client("local").view.workers == [] and not app.fleet.pending.get("local")
        await pilot.press("q")
    listed = json.loads(hive("worker", "list", "--models-dir", str(models_dir), "--json", check=True).stdout)
    assert listed["workers"] == []
    home = str(isolated_home)
    assert not [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline", "create_time"])
        if p.info["create_time"] >= started
        and "rbee_tui.worker" in " ".join(p.info["cmdline"] or [])
        and home in " ".join(p.info["cmdline"] or [])
    ]


async def test_with_room_the_dialog_shows_the_prediction_and_spawn_is_offered(
    models_dir: Path, hive: Callable[..., Any]
) -> None:
    memory = tiny_memory(hive, models_dir)
    app = app_for(models_dir)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: cells(app, 0).get("tiny-test") is not None, what="the catalog")
        await until(pilot, lambda: app.fleet.client("local").view.last_sample is not None, what="a sample")
        await pilot.press("3", "s")
        await until(pilot, lambda: isinstance(app.screen, SpawnDialog), 10, "the spawn dialog")
        await pilot.pause(0.2)
        assert text(app, "#dialog-error") == ""
        assert not app.screen.query_one("#ok", Button).disabled
        line = text(app, "#spawn-memory")
        assert line.startswith(f"Predicted: {MemoryPrediction.from_json(memory).describe()}; ")
        assert line.endswith("free for workers on local")
        await pilot.press("escape", "q")
