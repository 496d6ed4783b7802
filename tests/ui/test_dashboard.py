"""The dashboard driven by Pilot on the real local pool and tiny model: download, spawn, prompt, stop, gauges."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from textual.widgets import DataTable, Input, ProgressBar, Static

from rbee_tui.app import RbeeApp
from rbee_tui.config import Config, PoolConfig
from rbee_tui.ui.screens.dialogs import SpawnDialog
from rbee_tui.ui.widgets.downloads import DownloadItem, DownloadsPane
from rbee_tui.ui.widgets.gauges import Gauge
from rbee_tui.ui.widgets.pools import PoolList
from tests.support import waiting
from tests.support.hub import HubServer


async def until(pilot, predicate, timeout: float = 30, what: str = "") -> float:
    return await waiting.until(predicate, timeout, what, sleep=pilot.pause)


def cells(app: RbeeApp, table_id: str, column: int) -> list[str]:
    table = app.query_one(table_id, DataTable)
    return [str(table.get_row_at(i)[column]) for i in range(table.row_count)]


def local_config(models_dir: Path) -> Config:
    return Config(pools=(PoolConfig(name="local", models_dir=str(models_dir)),))


async def test_opens_on_the_local_pool_with_tiny_test(models_dir: Path) -> None:
    app = RbeeApp(local_config(models_dir))
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.query_one("#catalog", DataTable).row_count == 5, what="the catalog")
        assert cells(app, "#catalog", 0) == ["qwen-0.5b", "tinyllama", "phi3", "mistral", "tiny-test"]
        assert cells(app, "#catalog", 4)[-1] == "✅"
        assert "local" in cells(app, "#catalog", 6)[-1]
        await pilot.press("q")
    assert app.return_code == 0


async def test_download_spawn_prompt_stop(models_dir: Path, hub: HubServer, medium_gguf: Path, hive) -> None:
    hub.add("rbee-test/medium-GGUF", "medium.gguf", data=medium_gguf.read_bytes())
    hub.throttle_bps = 3_000_000  # about two seconds: the bar is seen in the middle
    hive(
        "models",
        "register",
        "medium",
        "--repo",
        "rbee-test/medium-GGUF",
        "--file",
        "medium.gguf",
        "--models-dir",
        str(models_dir),
        check=True,
    )
    app = RbeeApp(local_config(models_dir), sample_interval=0.5)
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.query_one("#catalog", DataTable)
        await until(pilot, lambda: "medium" in cells(app, "#catalog", 0), what="the catalog")
        table.focus()
        table.move_cursor(row=cells(app, "#catalog", 0).index("medium"))
        await pilot.press("d")
        await pilot.press("2")
        pane = app.query_one(DownloadsPane)
        await until(pilot, lambda: len(pane.query(DownloadItem)) == 1, what="a download row")
        progress_seen = set()

        def done() -> bool:
            item = pane.query_one(DownloadItem)
            progress_seen.add(round(item.query_one(ProgressBar).percentage or 0, 1))
            return item.has_class("-done")

        await until(pilot, done, 60, "the download to finish")
        assert any(0 < p < 1 for p in progress_seen), "the bar moved through the middle"
        assert pane.query_one(DownloadItem).query_one(ProgressBar).percentage == 1.0
        await pilot.press("1")  # back to the catalog: hidden panes are drawn when shown
        await until(
            pilot,
            lambda: cells(app, "#catalog", 4)[cells(app, "#catalog", 0).index("medium")] == "✅",
            30,
            "the catalog to flip to downloaded",
        )

        # Spawn from the dialog.
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, SpawnDialog), what="the spawn dialog")
        await pilot.pause(0.2)  # let the dialog lay out before clicking in it
        await pilot.click("#ok")
        states: list[str] = []

        def ready() -> bool:
            seen = cells(app, "#workers", 5)
            if seen and (not states or states[-1] != seen[0]):
                states.append(seen[0])
            return bool(seen) and seen[0] == "ready"

        await until(pilot, ready, 60, "the worker to be ready")
        # A small model is ready within milliseconds: the row may show "ready" first; it never shows anything
        # else than the way there.
        assert set(states) <= {"spawning", "starting", "loading", "ready"} and states[-1] == "ready", states
        assert cells(app, "#workers", 1) == ["tiny-test"]

        # A quick prompt streams a reply.
        app.query_one("#workers", DataTable).focus()
        await pilot.press("p")
        assert app.query_one("#prompt", Input).has_focus
        await pilot.press(*"Hello bee", "enter")
        reply = app.query_one("#reply", Static)
        try:
            await until(pilot, lambda: "tok/s" in str(reply.render()), 30, "a reply")
        except AssertionError:
            worker = app.fleet.client("local").view.workers[0]
            log = Path(worker["log"]).read_text()[-2000:]
            raise AssertionError(f"no reply; shown: {reply.render()!s:.300}; worker {worker}; log: {log}") from None
        await until(pilot, lambda: cells(app, "#workers", 9)[0] != "-", 10, "last tokens/s in the table")

        # Its log follows.
        app.query_one("#workers", DataTable).focus()
        await pilot.press("l")
        await until(pilot, lambda: app.screen.__class__.__name__ == "WorkerLogScreen", 10, "the log screen")
        log = app.screen.query_one("#worker-log")
        await until(pilot, lambda: any("model loaded" in str(line.text) for line in log.lines), 30, "the log lines")
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is app.screen_stack[0], 10, "the main screen again")

        # Gauges show the numbers of the metrics stream.
        await pilot.press("4")
        view = app.fleet.client("local").view
        await until(pilot, lambda: view.last_sample is not None, 30, "a sample")
        await pilot.pause(0.2)
        sample = view.last_sample
        ram_text = str(app.query_one("#g-ram", Gauge).query_one(".gauge-value").render())
        gib = 1024**3
        assert f"{sample['ram']['total'] / gib:.1f} GiB" in ram_text
        cpu_text = str(app.query_one("#g-cpu", Gauge).query_one(".gauge-value").render())
        assert f"of {os.cpu_count()} cores" in cpu_text

        # Stop.
        await pilot.press("3")
        app.query_one("#workers", DataTable).focus()
        await pilot.press("k")
        await until(pilot, lambda: app.query_one("#workers", DataTable).row_count == 0, 30, "the worker to go")
        await pilot.press("q")


async def test_errors_become_notifications_and_stay_in_the_log(models_dir: Path) -> None:
    app = RbeeApp(local_config(models_dir))
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.query_one("#catalog", DataTable).row_count == 5, what="the catalog")
        app.query_one("#catalog", DataTable).move_cursor(row=1)  # tinyllama: not downloaded, no hub reachable
        os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
        try:
            await pilot.press("d")
            await until(pilot, lambda: app.errors, 30, "an error")
        finally:
            del os.environ["HF_ENDPOINT"]
        assert "tinyllama" in app.errors[-1][1] and "cannot reach the model hub" in app.errors[-1][1]
        await pilot.press("e")
        await pilot.pause()
        assert app.screen.__class__.__name__ == "ErrorLogScreen"


async def test_theme_switch_is_remembered(models_dir: Path, isolated_home: Path) -> None:
    app = RbeeApp(local_config(models_dir), autostart=False)
    async with app.run_test(size=(100, 30)) as pilot:
        assert app.theme == "rbee-dark" and app.has_class("-theme-rbee-dark")
        await pilot.press("t")
        await until(pilot, lambda: (isolated_home / "config" / "rbee" / "config.toml").exists(), 10, "the config")
        assert app.theme == "rbee-light" and app.has_class("-theme-rbee-light")
    from rbee_tui import config

    assert config.load().theme == "rbee-light"


async def test_command_palette_lists_every_action(models_dir: Path) -> None:
    app = RbeeApp(local_config(models_dir), autostart=False)
    async with app.run_test(size=(100, 30)):
        titles = {c.title for c in app.get_system_commands(app.screen)}
    for action in (
        "Download",
        "Verify",
        "Register",
        "Unregister",
        "Spawn",
        "Stop",
        "Log",
        "Prompt",
        "Overview",
        "Add pool",
        "Edit pool",
        "Theme",
        "Errors",
        "Help",
        "Cancel dl",
    ):
        assert action in titles


async def test_add_pool_form_writes_the_config(models_dir: Path, isolated_home: Path) -> None:
    app = RbeeApp(local_config(models_dir), autostart=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("a")
        await pilot.pause()
        for key, value in (("name", "gpu-box"), ("transport", "ssh"), ("host", "gpu box"), ("backends", "cuda")):
            app.screen.query_one(f"#pool-{key}", Input).value = value
        app.screen.query_one("#pool-host", Input).focus()
        await pilot.press("enter")
        await pilot.pause()
        assert "invalid host name" in str(app.screen.query_one("#dialog-error", Static).render())
        app.screen.query_one("#pool-host", Input).value = "gpu-box.home.arpa"
        await pilot.press("enter")
        await until(pilot, lambda: len(app.fleet.config.pools) == 2, 10, "the pool to be saved")
        assert app.query_one(PoolList).item("gpu-box") is not None
    from rbee_tui import config

    saved = config.load()
    assert [p.name for p in saved.pools] == ["local", "gpu-box"]
    assert saved.pool("gpu-box").host == "gpu-box.home.arpa" and saved.pool("gpu-box").backends == ("cuda",)


async def test_overview_shows_every_pool(models_dir: Path) -> None:
    app = RbeeApp(local_config(models_dir), sample_interval=0.5)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.fleet.client("local").view.last_sample is not None, 30, "a sample")
        await pilot.press("o")
        await pilot.pause(0.6)
        card = app.screen.query_one("#card-local")
        assert "connected" in str(card.query_one(".card-state").render())
        await pilot.press("escape")
        await asyncio.sleep(0)
        assert app.screen.__class__.__name__ != "OverviewScreen"


async def test_register_unregister_and_cancel_a_download(models_dir: Path, hub: HubServer, medium_gguf: Path) -> None:
    hub.add("rbee-test/medium-GGUF", "medium.gguf", data=medium_gguf.read_bytes())
    hub.throttle_bps = 500_000  # slow: there is time to cancel
    app = RbeeApp(local_config(models_dir))
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.query_one("#catalog", DataTable).row_count == 5, what="the catalog")
        await pilot.press("n")
        await pilot.pause()
        for key, value in (
            ("id", "medium"),
            ("repo", "rbee-test/medium-GGUF"),
            ("file", "medium.gguf"),
            ("name", "Medium test model"),
        ):
            app.screen.query_one(f"#reg-{key}", Input).value = value
        app.screen.query_one("#reg-file", Input).focus()
        await pilot.press("enter")
        await until(pilot, lambda: "medium" in cells(app, "#catalog", 0), 30, "the new model in the catalog")
        row = cells(app, "#catalog", 0).index("medium")
        assert cells(app, "#catalog", 1)[row] == "Medium test model" and cells(app, "#catalog", 4)[row] == "❌"

        app.query_one("#catalog", DataTable).move_cursor(row=row)
        await pilot.press("d", "2")
        pane = app.query_one(DownloadsPane)
        await until(
            pilot,
            lambda: pane.query(DownloadItem) and pane.query_one(DownloadItem).has_class("-running"),
            30,
            "the download to run",
        )
        pane.focus()
        pane.index = 0
        await pilot.press("c")
        await until(pilot, lambda: pane.query_one(DownloadItem).has_class("-cancelled"), 30, "the cancel")
        assert app.fleet.downloads["local/medium"].state == "cancelled"
        await pilot.press("1")
        assert cells(app, "#catalog", 4)[cells(app, "#catalog", 0).index("medium")] == "❌"

        app.query_one("#catalog", DataTable).move_cursor(row=cells(app, "#catalog", 0).index("medium"))
        await pilot.press("x")
        await pilot.pause(0.2)
        await pilot.click("#ok")
        await until(pilot, lambda: "medium" not in cells(app, "#catalog", 0), 30, "the model to be unregistered")
