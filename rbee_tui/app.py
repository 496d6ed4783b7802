"""The Textual app: owns the services, composes the screens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Footer, Header, ListItem, ListView, Static

from rbee_tui.catalog import human_size
from rbee_tui.config import Config
from rbee_tui.errors import RbeeError
from rbee_tui.pools.client import PoolClient

THEMES_DIR = Path(__file__).resolve().parent.parent / "themes"


class RbeeApp(App[None]):
    """rbee-tui: pools on the left, the selected pool's catalog on the right."""

    TITLE = "rbee-tui"
    CSS_PATH = THEMES_DIR / "rbee-dark.tcss"
    BINDINGS = [Binding("q", "quit", "Quit"), Binding("r", "refresh", "Refresh")]

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.catalogs: dict[str, dict[str, Any]] = {}
        self.clients = {p.name: PoolClient(p) for p in config.pools}

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            yield ListView(*[ListItem(Static(p.name), id=f"pool-{p.name}") for p in self.config.pools], id="pools")
            yield DataTable(id="catalog", cursor_type="row")
        yield Static("", id="status")
        yield Footer()

    async def on_mount(self) -> None:
        for client in self.clients.values():
            client.start()
        table = self.query_one("#catalog", DataTable)
        table.add_columns("ID", "Name", "Arch", "Size", "Downloaded", "Backends")
        self.action_refresh()

    async def on_unmount(self) -> None:
        for client in self.clients.values():
            await client.close()

    def action_refresh(self) -> None:
        """Reload every pool's catalog."""
        for pool in self.config.pools:
            self.load_catalog(pool.name)

    @work(exclusive=False, exit_on_error=False)
    async def load_catalog(self, pool_name: str) -> None:
        status = self.query_one("#status", Static)
        try:
            client = self.clients[pool_name]
            await client.wait_connected(30)
            doc = await client.hive("models", "catalog")
        except RbeeError as exc:
            self.notify(str(exc), severity="error")
            return
        self.catalogs[pool_name] = doc
        self.render_catalog(doc)
        status.update(f"pool {pool_name}: {len(doc['models'])} models")

    def render_catalog(self, doc: dict[str, Any]) -> None:
        table = self.query_one("#catalog", DataTable)
        table.clear()
        for m in doc["models"]:
            table.add_row(
                m["id"],
                m["name"],
                m["architecture"],
                human_size(m["size_bytes"]),
                "yes" if m["downloaded"] else "no",
                ",".join(m["backends"]),
                key=m["id"],
            )
