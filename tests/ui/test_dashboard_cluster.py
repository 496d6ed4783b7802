"""A cluster spawned from the dashboard over the local pool and two sshd pools: its plan first, then its nodes,
layer ranges and shares, and nothing left on any node once it is stopped."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from textual.widgets import DataTable

from rbee_tui.app import RbeeApp
from rbee_tui.config import Config, PoolConfig
from rbee_tui.ui.screens.dialogs import ClusterDialog, ConfirmDialog
from tests.e2e.test_cluster import MODEL, pytestmark, site, split_gguf  # noqa: F401 (its fixtures, shared)
from tests.support import waiting
from tests.support.hub import HubServer
from tests.support.site import Site

__all__ = ["pytestmark"]


async def until(pilot, predicate, timeout: float = 60, what: str = "") -> float:
    return await waiting.until(predicate, timeout, what, sleep=pilot.pause)


def rows(app: RbeeApp, table: str) -> list[list[str]]:
    t = app.screen_stack[0].query_one(table, DataTable)
    return [[str(c) for c in t.get_row_at(i)] for i in range(t.row_count)]


async def test_spawn_a_cluster_from_the_dashboard_and_see_its_nodes(
    site: Site,  # noqa: F811 (the fixture, by name)
    hub: HubServer,
    split_gguf: Path,  # noqa: F811
    hive: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    hub.add("rbee-test/split6-GGUF", "split6.gguf", data=split_gguf.read_bytes())
    hive("models", "register", MODEL, "--repo", "rbee-test/split6-GGUF", "--file", "split6.gguf", check=True)
    hive("models", "download", MODEL, check=True)
    config = Config(pools=(PoolConfig(name="local", transport="local"), *site.pools.values()))
    app = RbeeApp(config, sample_interval=0.5)
    async with app.run_test(size=(140, 50)) as pilot:
        await until(pilot, lambda: all(c.view.state == "connected" for c in app.fleet.clients.values()), 30)
        await until(pilot, lambda: MODEL in str(app.fleet.catalogs.get("local")), 30, "the catalog")
        await pilot.press("5")
        assert "press n" in str(app.screen.query_one("#clusters-pane .pane-empty").render())
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, ClusterDialog), 10, "the dialog")
        models = [m["id"] for m in app.fleet.catalogs["local"]["models"] if m["downloaded"]]  # the dialog's order
        await pilot.click("#cl-model")
        await pilot.press(*["down"] * models.index(MODEL), "enter")
        assert app.screen.query_one("#cl-model").value == MODEL
        await pilot.click("#cl-policy")
        await pilot.press("down", "enter")  # spread: every pool takes a part
        await pilot.click("#plan")
        plan = app.screen.query_one("#cl-plan")
        try:
            await until(pilot, lambda: "layers" in str(plan.render()), 60, "the plan")
        except AssertionError:
            raise AssertionError(
                f"plan shows {plan.render()!s}; errors {app.errors}; policy {app.screen.query_one('#cl-policy').value}"
            ) from None
        shown = str(plan.render())
        assert all(p in shown for p in ("local", "pool-a", "pool-b")), shown
        assert isinstance(app.screen, ClusterDialog)
        await pilot.click("#cl-ctx")
        await pilot.press("enter")  # Enter in a field spawns, as the Spawn button does
        nodes = "#cluster-nodes"
        board = app.fleet.clusters
        try:
            await until(pilot, lambda: MODEL in board.clusters and board.clusters[MODEL].state == "ready", 120)
        except AssertionError:
            c = board.clusters.get(MODEL)
            err = app.screen.query("#dialog-error")
            raise AssertionError(
                f"{c and c.state} {c and c.reason} {c and c.events[-3:]} {app.errors} {app.screen} "
                f"{err and err.first().render()}"
            ) from None
        await until(pilot, lambda: len(rows(app, nodes)) == 3, 10, "its nodes")
        table = rows(app, nodes)
        assert [r[0] for r in table] == ["local", "pool-a", "pool-b"]
        assert sum(int(r[2].rstrip("%")) for r in table) in (99, 100, 101)  # shares of the weights
        assert "coordinator" in table[0][6] and "output" in table[-1][6]
        for r in table:  # layer ranges as planned
            first, last = (int(x) for x in r[1].split("-"))
            assert first <= last
        assert rows(app, "#clusters")[0][1] == "ready"
        # Stop asks first; then nothing is left.
        await pilot.press("k")
        await until(pilot, lambda: isinstance(app.screen, ConfirmDialog), 10, "the question")
        await pilot.click("#ok")
        await until(pilot, lambda: not app.fleet.clusters.running(MODEL), 60, "the cluster to stop")
        assert rows(app, "#clusters")[0][1] == "stopped"


async def test_the_cluster_form_warns_about_a_pool_with_a_direct_rpc_link(models_dir: Path) -> None:
    config = Config(pools=(PoolConfig(name="local", models_dir=str(models_dir), rpc_host="127.0.0.1"),))
    app = RbeeApp(config)
    async with app.run_test(size=(140, 50)) as pilot:
        await until(pilot, lambda: app.fleet.client("local").view.state == "connected", 30, "the pool")
        await pilot.press("5", "n")
        await until(pilot, lambda: isinstance(app.screen, ClusterDialog), 10, "the dialog")
        await until(pilot, lambda: app.screen.query("#cl-warning"), 10, "the warning")
        text = str(app.screen.query_one("#cl-warning").render())
        assert "local" in text and "no authentication" in text
