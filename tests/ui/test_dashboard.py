"""The dashboard driven as a person drives it, with keys and clicks, on the real local pool and tiny model."""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path

from textual import events
from textual.color import Color
from textual.widgets import DataTable, ListView, ProgressBar

from rbee_tui.app import RbeeApp
from rbee_tui.config import Config, PoolConfig
from rbee_tui.ui.format import gib
from rbee_tui.ui.screens.dialogs import ConfirmDialog, PoolDialog, RegisterDialog, SpawnDialog
from rbee_tui.ui.screens.info import ErrorLogScreen, HelpScreen, OverviewScreen, WorkerLogScreen
from rbee_tui.ui.widgets.catalog import COLUMNS
from rbee_tui.ui.widgets.downloads import DownloadItem, DownloadsPane
from rbee_tui.ui.widgets.gauges import Gauge
from rbee_tui.ui.widgets.pools import PoolList, one_line
from tests.support import waiting
from tests.support.hub import HubServer


async def until(pilot, predicate, timeout: float = 30, what: str = "") -> float:
    return await waiting.until(predicate, timeout, what, sleep=pilot.pause)


def cells(app: RbeeApp, table_id: str, column: int) -> list[str]:
    table = app.screen_stack[0].query_one(table_id, DataTable)
    return [str(table.get_row_at(i)[column]) for i in range(table.row_count)]


DOWNLOADED, NAME = COLUMNS.index("Downloaded"), COLUMNS.index("Name")


def local_config(models_dir: Path) -> Config:
    return Config(pools=(PoolConfig(name="local", models_dir=str(models_dir)),))


def shown(app: RbeeApp, selector: str) -> str:
    """The text a widget shows."""
    return str(app.screen.query_one(selector).render())


async def type_text(pilot, text: str) -> None:
    await pilot.press(*[{" ": "space", "/": "slash", ".": "full_stop"}.get(c, c) for c in text])


async def cursor_to(pilot, app: RbeeApp, table_id: str, key: str) -> None:
    """Move a table's cursor to the row `key` with the arrow keys, as a person would."""
    table = app.screen_stack[0].query_one(table_id, DataTable)
    keys = [row.key.value for row in table.ordered_rows]
    target = keys.index(key)
    while table.cursor_row != target:
        await pilot.press("down" if table.cursor_row < target else "up")


def screen_lines(app: RbeeApp) -> list[str]:
    """The terminal's text as the user sees it, one string per line."""
    return [strip.text for strip in app.screen._compositor.render_strips()]


def pool_rows_on_screen(app: RbeeApp) -> dict[str, tuple[int, int, str, str]]:
    """Every pool row drawn in the list: pool -> (x, y) of its name line and the two lines' text."""
    region = app.screen_stack[0].query_one(PoolList).scrollable_content_region  # the rows, not the scrollbar
    lines = [line[region.x : region.right].strip() for line in screen_lines(app)[region.y : region.bottom]]
    rows = {}
    for y, (title, detail) in enumerate(itertools.pairwise(lines), region.y):
        mark, _, name = title.partition(" ")
        if mark in ("●", "◌", "✖", "?") and name and name not in rows:
            rows[name] = (region.x + 1, y, title, detail)
    return rows


def pool_on_screen(app: RbeeApp, pool: str) -> tuple[int, int] | None:
    """Where `pool`'s name is drawn (screen x, y), or None if its row is not in view."""
    row = pool_rows_on_screen(app).get(pool)
    return row[:2] if row else None


async def click_pool(pilot, pool: str) -> None:
    """Click a pool's row where it is drawn, as a person would."""
    at = pool_on_screen(pilot.app, pool)
    assert at is not None, f"{pool} is not in view"
    await pilot.click(offset=at)
    await pilot.pause()


async def test_enter_and_click_on_a_pool_go_into_its_panes(models_dir: Path) -> None:
    app = RbeeApp(local_config(models_dir))
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: len(cells(app, "#catalog", 0)) == 5, what="the catalog")
        assert isinstance(app.focused, PoolList)  # where a new user starts
        await pilot.press("enter")  # this crashed the app once
        assert app.focused is app.query_one("#catalog", DataTable)
        await click_pool(pilot, "local")
        assert app.is_running and app.focused is app.query_one("#catalog", DataTable)
        # A click on a pane's tab makes that pane's keys work at once.
        await pilot.click("#--content-tab-tab-workers")
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, SpawnDialog), 10, "the spawn dialog")
        await pilot.press("escape")
        await pilot.click("#--content-tab-tab-catalog")
        assert app.focused is app.query_one("#catalog", DataTable)
        assert cells(app, "#catalog", 0) == ["qwen-0.5b", "tinyllama", "phi3", "mistral", "tiny-test"]
        assert cells(app, "#catalog", DOWNLOADED)[-1] == "✅"
        assert "local" in cells(app, "#catalog", 6)[-1]
        await pilot.press("q")
    assert app.return_code == 0


def assert_rows_drawn(app: RbeeApp) -> None:
    """Every row in view shows what the list holds for its pool (nothing stale from before a scroll)."""
    pools = app.screen_stack[0].query_one(PoolList)
    drawn = pool_rows_on_screen(app)
    assert drawn
    for pool, (_, _, title, detail) in drawn.items():
        row = pools.row(pool)
        assert row is not None, pool
        for drawn, text in zip((title, detail), row.lines, strict=True):
            # A line too long for the list is cut with an ellipsis.
            assert drawn == text or (drawn.endswith("…") and text.startswith(drawn[:-1].rstrip())), (pool, drawn)


async def test_a_long_pool_list_by_keys_wheel_and_clicks(models_dir: Path, tmp_path: Path) -> None:
    """More pools than fit: a pool that never answers, 30 that refuse, and the live local pool at the bottom."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts and never says a word: a pool stuck connecting
    kh = str(tmp_path / "kh")
    gone = [
        PoolConfig(name=f"gone-{i:02d}", transport="ssh", host="127.0.0.1", port=9, known_hosts=kh) for i in range(30)
    ]
    hush = PoolConfig(name="hush", transport="ssh", host="127.0.0.1", port=silent.getsockname()[1], known_hosts=kh)
    app = RbeeApp(Config(pools=(hush, *gone, local_config(models_dir).pools[0])), sample_interval=0.5, max_backoff=60)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            pools = app.query_one(PoolList)
            assert app.focused is pools and app.selected == "hush"
            error, warning = (Color.parse(c) for c in (app.current_theme.error, app.current_theme.warning))

            def styled(pool: str, color: Color, bold: bool | None = None) -> bool:
                at = pool_on_screen(app, pool)
                style = app.screen.get_style_at(*at) if at else None
                if style is None or bold not in (None, style.bold):
                    return False
                drawn = Color.from_rich_color(style.color)  # blended over the row's background: a shade off
                return max(abs(a - b) for a, b in zip(drawn.rgb, color.rgb, strict=True)) <= 8

            # A lost pool says so on its second line, its name in the theme's error colour; a pending one in amber.
            await until(pilot, lambda: styled("gone-00", error, bold=True), 30, "gone-00 drawn as lost")
            assert pool_rows_on_screen(app)["gone-00"][3].startswith(("lost: ", "reconnecting: "))
            assert app.fleet.client("hush").view.state == "connecting" and styled("hush", warning)
            assert_rows_drawn(app)

            # j/k and the arrows move the highlight; the list follows it down to the last pool.
            await pilot.press("j")
            assert app.selected == "gone-00" and shown(app, "#status-line").startswith("gone-00: ")
            await pilot.press("k")
            assert app.selected == "hush"
            await pilot.press(*["down"] * 31)
            assert app.selected == "local" and shown(app, "#status-line").startswith("local: ")
            assert pool_on_screen(app, "local") is not None and pool_on_screen(app, "hush") is None
            await until(pilot, lambda: "RAM" in pool_rows_on_screen(app)["local"][3], 30, "local's load on its row")
            assert_rows_drawn(app)

            # The wheel scrolls the rows without moving the highlight; rows brought into view are drawn as they are.
            while pool_on_screen(app, "hush") is None:
                before = pools.scroll_offset.y
                await pilot._post_mouse_events([events.MouseScrollUp], "#pools", offset=(3, 3))
                assert pools.scroll_offset.y < before, "the wheel scrolled the list"
            assert app.selected == "local" and pool_on_screen(app, "local") is None
            assert_rows_drawn(app)
            await pilot._post_mouse_events([events.MouseScrollDown], "#pools", offset=(3, 3))
            assert_rows_drawn(app)

            # A click on a row shows that pool and goes into its panes.
            await click_pool(pilot, "gone-12")
            assert app.selected == "gone-12" and app.focused is app.query_one("#catalog", DataTable)
            await until(pilot, lambda: "pool gone-12 is " in shown(app, "#catalog-pane .pane-empty"), 10)
            await pilot.press("q")
    finally:
        silent.close()


async def test_download_spawn_prompt_log_gauges_stop(models_dir: Path, hub: HubServer, medium_gguf: Path, hive) -> None:
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
        await until(pilot, lambda: "medium" in cells(app, "#catalog", 0), what="the catalog")
        await pilot.press("1")
        await cursor_to(pilot, app, "#catalog", "medium")
        await pilot.press("d", "2")
        pane = app.query_one(DownloadsPane)
        await until(pilot, lambda: len(pane.query(DownloadItem)) == 1, what="a download row")
        progress_seen = set()

        def done() -> bool:
            item = pane.query_one(DownloadItem)
            progress_seen.add(round(item.query_one(ProgressBar).percentage or 0, 1))
            return item.has_class("-done")

        await until(pilot, done, 60, "the download to finish")
        assert any(0 < p < 1 for p in progress_seen), "the bar moved through the middle"
        await pilot.press("1")
        await until(
            pilot,
            lambda: cells(app, "#catalog", DOWNLOADED)[cells(app, "#catalog", 0).index("medium")] == "✅",
            30,
            "the catalog to flip to downloaded",
        )

        # The Workers pane says what to press while it is empty; s opens the spawn dialog.
        await pilot.press("3")
        assert "press s to spawn" in shown(app, "#workers-pane .pane-empty")
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, SpawnDialog), what="the spawn dialog")
        assert not app.screen.query_one("#spawn-gpu").display, "no GPU field for the CPU backend"
        await pilot.pause(0.2)
        await pilot.click("#ok")
        states: list[str] = []

        def ready() -> bool:
            seen = cells(app, "#workers", 2)
            if seen and (not states or states[-1] != seen[0]):
                states.append(seen[0])
            return bool(seen) and seen[0] == "ready"

        await until(pilot, ready, 60, "the worker to be ready")
        assert set(states) <= {"spawning", "starting", "loading", "ready"} and states[-1] == "ready", states
        assert cells(app, "#workers", 1) == ["tiny-test"]  # the dialog offers the first downloaded model

        # A quick prompt streams a reply; Escape leaves the input, and the pane's keys work again.
        await pilot.press("3", "p")
        assert app.focused is app.query_one("#prompt")
        await type_text(pilot, "Hello bee")
        await pilot.press("enter")
        await until(pilot, lambda: "tok/s" in shown(app, "#reply"), 30, "a reply")
        await until(pilot, lambda: cells(app, "#workers", 9)[0] != "-", 10, "last tokens/s in the table")
        await pilot.press("escape")
        assert app.focused is app.query_one("#workers", DataTable)

        # Its log follows.
        await pilot.press("l")
        await until(pilot, lambda: isinstance(app.screen, WorkerLogScreen), 10, "the log screen")
        log = app.screen.query_one("#worker-log")
        await until(pilot, lambda: any("model loaded" in str(line.text) for line in log.lines), 30, "the log lines")
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is app.screen_stack[0], 10, "the main screen again")

        # Gauges show the numbers of the metrics stream.
        await pilot.press("4")
        view = app.fleet.client("local").view
        await until(pilot, lambda: view.last_sample is not None, 30, "a sample")
        await pilot.pause(0.6)
        sample = view.last_sample
        ram_text = str(app.query_one("#g-ram", Gauge).query_one(".gauge-value").render())
        assert f"{sample.ram.total / 1024**3:.1f} GiB" in ram_text
        cpu_text = str(app.query_one("#g-cpu", Gauge).query_one(".gauge-value").render())
        assert f"of {os.cpu_count()} cores" in cpu_text

        # Stop asks first, with the safe answer focused: Enter keeps the worker.
        await pilot.press("3", "k")
        await until(pilot, lambda: isinstance(app.screen, ConfirmDialog), 10, "the question")
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert cells(app, "#workers", 2) == ["ready"]
        await pilot.press("k")
        await until(pilot, lambda: isinstance(app.screen, ConfirmDialog), 10, "the question")
        await pilot.click("#ok")
        await until(pilot, lambda: app.query_one("#workers", DataTable).row_count == 0, 30, "the worker to go")

        # A new worker that reuses the id starts with no tokens/s and a log of its own.
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, SpawnDialog), 10, "the spawn dialog")
        await pilot.pause(0.2)
        await pilot.click("#ok")
        await until(pilot, lambda: cells(app, "#workers", 2) == ["ready"], 60, "the new worker")
        assert cells(app, "#workers", 0) == ["worker-cpu-0"] and cells(app, "#workers", 9) == ["-"]
        await pilot.press("l")
        await until(pilot, lambda: isinstance(app.screen, WorkerLogScreen), 10, "the log screen")
        log = app.screen.query_one("#worker-log")
        await until(pilot, lambda: any("model loaded" in str(line.text) for line in log.lines), 30, "the log lines")
        await pilot.pause(0.5)
        assert sum("--- " in str(line.text) for line in log.lines) == 1, "only the new worker's log"
        await pilot.press("escape")
        await pilot.press("q")


async def test_keys_belong_to_their_pane_and_screen(models_dir: Path) -> None:
    app = RbeeApp(local_config(models_dir), autostart=False)
    async with app.run_test(size=(120, 40)) as pilot:
        # On the pool list no pane key is offered (k moves up the list there); in the catalog only the catalog's.
        keys = set(app.screen.active_bindings)
        assert {"d", "s", "l", "c"}.isdisjoint(keys) and {"q", "o", "m", "1"} <= keys
        assert app.screen.active_bindings["k"].binding.action == "cursor_up"
        await pilot.press("1")
        keys = set(app.screen.active_bindings)
        assert {"d", "v", "n", "x"} <= keys and {"s", "k", "l", "c"}.isdisjoint(keys)
        await pilot.press("3")
        keys = set(app.screen.active_bindings)
        assert {"s", "k", "l", "p"} <= keys and {"d", "v", "c"}.isdisjoint(keys)
        await pilot.press("2")
        assert "c" in app.screen.active_bindings and app.focused is app.query_one("#downloads-list", ListView)

        # The board has its own keys: m does not stack a second board, k stops nothing.
        await pilot.press("m")
        board = app.screen
        await pilot.press("m", "k")
        assert app.screen is board and len(app.screen_stack) == 2
        assert {"a", "r", "c", "x", "f", "i", "e"} <= set(board.active_bindings)
        assert {"s", "d", "o"}.isdisjoint(board.active_bindings)

        # Help and the palette show what works on the screen in view.
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = app.screen.query_one("Markdown").source
        assert "Run all" in text and "Spawn" not in text
        await pilot.press("escape")
        titles = {c.title for c in app.get_system_commands(board)}
        assert "Job board: Run all" in titles and not any(t.startswith("Catalog:") for t in titles)
        await pilot.press("escape")
        titles = {c.title for c in app.get_system_commands(app.screen)}
        for t in (
            "Catalog (1): Download",
            "Downloads (2): Cancel download",
            "Workers (3): Spawn",
            "Dashboard: Overview",
        ):
            assert t in titles, t
        assert "Job board: Run all" not in titles and "Theme" not in titles and "Theme: rbee-light" in titles
        await pilot.press("question_mark")
        text = app.screen.query_one("Markdown").source
        assert "Download" in text and "Spawn" in text and "Run all" not in text


async def test_errors_become_notifications_and_stay_in_the_log(models_dir: Path) -> None:
    app = RbeeApp(local_config(models_dir))
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: len(cells(app, "#catalog", 0)) == 5, what="the catalog")
        await pilot.press("1")
        await cursor_to(pilot, app, "#catalog", "tinyllama")  # not downloaded, no hub reachable
        await pilot.press("v")  # verify says why, not "exit 1"
        await until(pilot, lambda: app.errors, 30, "an error")
        assert "tinyllama is not downloaded" in app.errors[-1][1]
        os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
        try:
            await pilot.press("d")
            await until(pilot, lambda: len(app.errors) == 2, 30, "an error")
        finally:
            del os.environ["HF_ENDPOINT"]
        assert "tinyllama" in app.errors[-1][1] and "cannot reach the model hub" in app.errors[-1][1]
        await pilot.press("e")
        await pilot.pause()
        assert isinstance(app.screen, ErrorLogScreen)


async def test_theme_switch_is_remembered_from_the_key_and_the_palette(models_dir: Path, isolated_home: Path) -> None:
    from rbee_tui import config

    app = RbeeApp(local_config(models_dir), autostart=False)
    path = isolated_home / "config" / "rbee" / "config.toml"
    async with app.run_test(size=(100, 30)) as pilot:
        assert app.theme == "rbee-dark" and app.has_class("-theme-rbee-dark")
        await pilot.press("t")
        await until(pilot, lambda: path.exists() and config.load().theme == "rbee-light", 10, "the config")
        assert app.has_class("-theme-rbee-light")
        await pilot.press("ctrl+p")
        await type_text(pilot, "Theme: rbee-dark")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await until(pilot, lambda: config.load().theme == "rbee-dark", 10, "the palette's choice saved")
        assert app.theme == "rbee-dark"


async def test_add_pool_form_by_keys(models_dir: Path, isolated_home: Path) -> None:
    app = RbeeApp(local_config(models_dir), autostart=False)
    async with app.run_test(size=(120, 50)) as pilot:
        await pilot.press("a")
        await until(pilot, lambda: isinstance(app.screen, PoolDialog), 10, "the form")
        assert app.focused is app.screen.query_one("#pool-name")  # typing goes into the first field
        await type_text(pilot, "local")  # a name that exists is refused
        await pilot.press("enter")
        await pilot.pause()
        assert "a pool named local exists" in shown(app, "#dialog-error")
        await pilot.press(*["backspace"] * 5)
        await type_text(pilot, "gpu-box")
        await pilot.press("tab", "tab")  # transport is ssh already
        await type_text(pilot, "gpu box")
        await pilot.press("enter")
        await pilot.pause()
        assert "invalid host name" in shown(app, "#dialog-error")
        await pilot.press(*["backspace"] * 7)
        await type_text(pilot, "gpu-box.home.arpa")
        await pilot.press("enter")
        await until(pilot, lambda: len(app.fleet.config.pools) == 2, 10, "the pool to be saved")
        assert app.query_one(PoolList).row("gpu-box") is not None
        await until(pilot, lambda: pool_on_screen(app, "gpu-box") is not None, 10, "the new pool's row")
    from rbee_tui import config

    saved = config.load()
    assert [p.name for p in saved.pools] == ["local", "gpu-box"]
    assert saved.pool("gpu-box").host == "gpu-box.home.arpa" and saved.pool("local").transport == "local"


async def test_overview_cards_open_their_pool(models_dir: Path) -> None:
    config = Config(
        pools=(
            PoolConfig(name="local", models_dir=str(models_dir)),
            PoolConfig(name="other", models_dir=str(models_dir)),
        )
    )
    app = RbeeApp(config, sample_interval=0.5)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.fleet.client("local").view.last_sample is not None, 30, "a sample")
        await pilot.press("o")
        await until(pilot, lambda: isinstance(app.screen, OverviewScreen), 10, "the overview")
        await until(pilot, lambda: "connected" in shown(app, "#card-local .card-state"), 10, "the card")
        await pilot.click("#card-other")
        await until(pilot, lambda: app.screen is app.screen_stack[0], 10, "back on the dashboard")
        assert app.selected == "other"
        await pilot.press("o")
        await pilot.pause(0.3)
        await pilot.press("enter")  # the first card has the focus: the keyboard opens it too
        await until(pilot, lambda: app.screen is app.screen_stack[0], 10, "back on the dashboard")
        assert app.selected == "local"


async def test_a_covered_dashboard_catches_up_when_shown_again(models_dir: Path) -> None:
    """Samples are not drawn under a screen that covers the dashboard; going back shows the latest at once."""
    app = RbeeApp(local_config(models_dir), sample_interval=3)  # the first sample comes after 3 s, the next 3 s on
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("4", "o")
        await until(pilot, lambda: isinstance(app.screen, OverviewScreen), 10, "the overview")
        view = app.fleet.client("local").view
        await until(pilot, lambda: view.last_sample is not None, 30, "the first sample, under the overview")
        # The card shows the sample: it was routed to the screens (the dashboard, covered, did not draw it).
        await until(pilot, lambda: " / " in shown(app, "#card-local .card-label"), 10, "the card's RAM")
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is app.screen_stack[0] and len(view.history) == 1  # no second sample drew it meanwhile
        assert pool_rows_on_screen(app)["local"][2:] == ("● local", one_line(view.last_sample))
        assert shown(app, "#status-line").startswith("local: connected")
        ram = view.last_sample.ram
        assert shown(app, "#g-ram .gauge-value").startswith(f"{gib(ram.used)} / {gib(ram.total)}")


async def test_register_cancel_a_download_and_unregister_by_keys(
    models_dir: Path, hub: HubServer, medium_gguf: Path
) -> None:
    hub.add("rbee-test/medium-GGUF", "medium.gguf", data=medium_gguf.read_bytes())
    hub.throttle_bps = 500_000  # slow: there is time to cancel
    app = RbeeApp(local_config(models_dir))
    async with app.run_test(size=(120, 50)) as pilot:
        await until(pilot, lambda: len(cells(app, "#catalog", 0)) == 5, what="the catalog")
        await pilot.press("2")
        assert "No downloads yet" in shown(app, "#downloads .pane-empty")
        await pilot.press("1", "n")
        await until(pilot, lambda: isinstance(app.screen, RegisterDialog), 10, "the form")
        for value in ("medium", "rbee-test/medium-GGUF", "medium.gguf", "Medium test model"):
            await type_text(pilot, value)
            await pilot.press("tab")
        await pilot.press("enter")
        await until(pilot, lambda: "medium" in cells(app, "#catalog", 0), 30, "the new model in the catalog")
        row = cells(app, "#catalog", 0).index("medium")
        assert (
            cells(app, "#catalog", NAME)[row] == "Medium test model" and cells(app, "#catalog", DOWNLOADED)[row] == "❌"
        )

        await cursor_to(pilot, app, "#catalog", "medium")
        await pilot.press("d", "2")
        pane = app.query_one(DownloadsPane)
        await until(pilot, lambda: pane.query(DownloadItem) and pane.query_one(DownloadItem).has_class("-running"))
        # Quitting now asks first; the safe answer is focused.
        await pilot.press("q")
        await until(pilot, lambda: isinstance(app.screen, ConfirmDialog), 10, "the question")
        assert "download of medium" in shown(app, ".dialog-title")
        await pilot.press("enter")
        assert app.is_running
        await pilot.press("2", "c")  # no cursor moves needed
        await until(pilot, lambda: pane.query_one(DownloadItem).has_class("-cancelled"), 30, "the cancel")
        await pilot.press("1")
        await until(
            pilot, lambda: cells(app, "#catalog", DOWNLOADED)[cells(app, "#catalog", 0).index("medium")] == "❌"
        )

        await cursor_to(pilot, app, "#catalog", "medium")
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, ConfirmDialog), 10, "the question")
        await pilot.click("#ok")
        await until(pilot, lambda: "medium" not in cells(app, "#catalog", 0), 30, "the model to be unregistered")


async def test_the_dashboard_follows_workers_started_and_stopped_elsewhere(models_dir: Path, hive) -> None:
    app = RbeeApp(local_config(models_dir), sample_interval=0.5)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.fleet.client("local").view.state == "connected", 30, "the pool")
        await pilot.press("3")
        hive("worker", "spawn", "cpu", "--model", "tiny-test", "--models-dir", str(models_dir), "--wait", check=True)
        await until(pilot, lambda: cells(app, "#workers", 0) == ["worker-cpu-0"], 10, "the worker to show")
        hive("worker", "stop", "worker-cpu-0", check=True)
        await until(pilot, lambda: cells(app, "#workers", 0) == [] or "exited" in cells(app, "#workers", 2)[0], 10)


async def test_a_lost_pool_says_so_in_every_pane(models_dir: Path, tmp_path: Path) -> None:
    config = Config(
        pools=(
            PoolConfig(name="local", models_dir=str(models_dir)),
            PoolConfig(name="gone", transport="ssh", host="127.0.0.1", port=9, known_hosts=str(tmp_path / "kh")),
        )
    )
    app = RbeeApp(config, max_backoff=60)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.fleet.client("gone").view.state == "lost", 30, "the pool to be lost")
        await pilot.press("down")
        await until(pilot, lambda: app.selected == "gone", 10)
        await until(pilot, lambda: "pool gone is lost" in shown(app, "#catalog-pane .pane-empty"), 10)
        await pilot.press("3")
        assert "pool gone is lost" in shown(app, "#workers-pane .pane-empty")
        await pilot.press("4")
        await until(pilot, lambda: "pool gone is lost" in shown(app, "#gauges-note"), 10)
        assert not app.query_one("#g-ram").display or not app.query_one("#g-ram").is_on_screen


USER_CONFIG = """\
# my lab: keep this comment
theme = "rbee-dark"
future_key = "kept"  # a key this release does not know

[registry]
endpoint = "https://huggingface.co"

[[pools]]
name = "local"
transport = "local"
models_dir = "{models}"
hive_command = "rbee-hive"
llama_server = "/opt/llama/llama-server"  # my own build
known_hosts = "~/.ssh/lab_known_hosts"
memory_budget = "8 GiB"  # what its workers may use
backends = ["cpu"]

[matrix]
models = ["tiny-test"]
max_tokens = 8  # short runs
"""


async def test_saves_from_the_ui_keep_everything_the_user_wrote(models_dir: Path, isolated_home: Path) -> None:
    from rbee_tui import config

    path = isolated_home / "config" / "rbee" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(USER_CONFIG.format(models=models_dir))
    app = RbeeApp(config.load(), autostart=False)
    async with app.run_test(size=(120, 50)) as pilot:
        await pilot.press("t")
        await until(pilot, lambda: 'theme = "rbee-light"' in path.read_text(), 10, "the theme saved")
        await pilot.press("E")
        await until(pilot, lambda: isinstance(app.screen, PoolDialog), 10, "the form")
        assert app.screen.query_one("#pool-llama_server").value == "/opt/llama/llama-server"
        await pilot.click("#pool-backends")
        await pilot.press("end", *["backspace"] * 3)
        await type_text(pilot, "cpu,cuda")
        await pilot.press("enter")
        await until(pilot, lambda: "cuda" in path.read_text(), 10, "the pool saved")
        # The pool reconnects with the entry as saved, keys the form does not show included.
        await until(pilot, lambda: app.fleet.client("local").pool.backends == ("cpu", "cuda"), 10, "reconnected")
        assert app.fleet.client("local").pool.memory_budget == 8 << 30
        await pilot.press("a")
        await until(pilot, lambda: isinstance(app.screen, PoolDialog), 10, "the form")
        await type_text(pilot, "box")
        await pilot.press("tab", "tab")
        await type_text(pilot, "box.home.arpa")
        await pilot.press("enter")
        await until(pilot, lambda: "box.home.arpa" in path.read_text(), 10, "the new pool saved")
    text = path.read_text()
    for kept in (
        "# my lab: keep this comment",
        'future_key = "kept"',
        'llama_server = "/opt/llama/llama-server"  # my own build',
        'known_hosts = "~/.ssh/lab_known_hosts"',
        'memory_budget = "8 GiB"  # what its workers may use',
        "max_tokens = 8  # short runs",
        'models = ["tiny-test"]',
    ):
        assert kept in text, kept
    cfg = config.load()
    assert cfg.pool("local").backends == ("cpu", "cuda") and cfg.matrix.max_tokens == 8
