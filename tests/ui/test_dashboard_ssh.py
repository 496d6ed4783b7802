"""The dashboard over two real SSH pools: both update live; one dying does not disturb the other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee_tui.app import RbeeApp
from rbee_tui.config import Config
from rbee_tui.ui.widgets.pools import PoolList
from tests.support import waiting
from tests.support.hub import HubServer
from tests.support.site import Site
from tests.support.sshd import sshd_available

pytestmark = pytest.mark.skipif(sshd_available() is not None, reason=str(sshd_available()))


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    hub = HubServer().start()
    s = Site(tmp_path, hub)
    yield s
    s.stop()
    hub.stop()


async def until(pilot, predicate, timeout: float = 30, what: str = "") -> float:
    return await waiting.until(predicate, timeout, what, sleep=pilot.pause)


def row_text(app: RbeeApp, pool: str) -> str:
    row = app.query_one(PoolList).row(pool)
    assert row is not None
    return " ".join(row.lines)


async def test_two_pools_live_and_one_lost(site: Site) -> None:
    config = Config(pools=tuple(site.pools.values()))
    app = RbeeApp(config, sample_interval=0.5, keepalive_interval=2, keepalive_count_max=3, max_backoff=1)
    async with app.run_test(size=(120, 40)) as pilot:
        a, b = app.fleet.client("pool-a").view, app.fleet.client("pool-b").view
        await until(pilot, lambda: len(a.history) >= 2 and len(b.history) >= 2, 30, "both pools to stream")
        await until(
            pilot,
            lambda: "RAM" in row_text(app, "pool-a") and "RAM" in row_text(app, "pool-b"),
            10,
            "both rows to show their load",
        )
        await pilot.press("4")
        site.sshd["pool-a"].kill()
        took = await until(
            pilot,
            lambda: "lost" in row_text(app, "pool-a") or "reconnecting" in row_text(app, "pool-a"),
            15,
            "pool-a to show as lost",
        )
        assert took < 15
        before = len(b.history)
        await until(pilot, lambda: len(b.history) >= before + 3, 10, "pool-b to keep streaming")
        assert "RAM" in row_text(app, "pool-b")
        app.query_one(PoolList).focus()
        await pilot.press("down")  # pool-b's gauges keep moving on screen
        await pilot.pause(0.2)
        assert app.selected == "pool-b"
        site.sshd["pool-a"].start()
        await until(pilot, lambda: a.state == "connected", 30, "pool-a to come back")
        await until(pilot, lambda: "RAM" in row_text(app, "pool-a"), 10, "pool-a's row to show its load again")


async def test_unknown_host_key_dialog(site: Site, tmp_path: Path) -> None:
    from dataclasses import replace

    from rbee_tui.ui.screens.dialogs import HostKeyDialog

    pool = replace(site.pools["pool-a"], known_hosts=str(tmp_path / "fresh_known_hosts"))
    app = RbeeApp(Config(pools=(pool,)), sample_interval=0.5, max_backoff=1)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, HostKeyDialog), 30, "the host key dialog")
        await until(pilot, lambda: app.screen.query("Label"), 10, "the dialog drawn")
        text = " ".join(str(w.render()) for w in app.screen.query("Label"))
        assert "SHA256:" in text and "pool-a" in text
        await pilot.pause(0.2)
        await pilot.click("#ok")
        await until(pilot, lambda: app.fleet.client("pool-a").view.state == "connected", 30, "the pool to connect")
    assert "127.0.0.1" in (tmp_path / "fresh_known_hosts").read_text()


def _live_workers(home: Path) -> list[int]:
    """Pids of the node's registered workers that still run."""
    import json
    import os

    pids = []
    for registry in home.rglob("workers.json"):
        for w in json.loads(registry.read_text()).get("workers", []):
            try:
                os.kill(w["pid"], 0)
            except ProcessLookupError:
                continue
            pids.append(w["pid"])
    return pids


async def test_quitting_during_a_matrix_run_leaves_no_worker_on_the_node(site: Site) -> None:
    from rbee_tui.ui.screens.dialogs import ConfirmDialog

    app = RbeeApp(Config(pools=(site.pools["pool-a"],)), sample_interval=0.5)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.fleet.client("pool-a").view.state == "connected", 30, "the pool")
        await pilot.press("m")
        await until(pilot, lambda: app.fleet.matrix.cells, 30, "the plan")
        await pilot.press("a")
        board = app.fleet.matrix
        await until(
            pilot,
            lambda: any(j.state in ("loading", "running", "verifying") for j in board.jobs.values()),
            60,
            "a worker to be up",
        )
        await pilot.press("q")
        await until(pilot, lambda: isinstance(app.screen, ConfirmDialog), 10, "the question")
        await pilot.click("#ok")
    # The run was stopped, and its workers with it, before the connection closed.
    assert _live_workers(site.root / "home-pool-a") == []
