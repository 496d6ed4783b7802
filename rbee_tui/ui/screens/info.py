"""Screens that show things: the overview of every pool, a worker's log, the error log, help."""

from __future__ import annotations

import time
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.screen import Screen
from textual.widgets import Footer, Header, Markdown, RichLog

from rbee_tui.errors import RbeeError
from rbee_tui.ui.widgets.pools import PoolCard


class OverviewScreen(Screen[None]):
    """Every pool side by side, as compact cards: for clusters of many machines."""

    BINDINGS = [Binding("escape,o", "dismiss", "Back")]

    def __init__(self, pools: list[str]) -> None:
        super().__init__()
        self.pools = pools

    def compose(self) -> ComposeResult:
        yield Header()
        with Grid(id="overview"):
            for p in self.pools:
                yield PoolCard(p)
        yield Footer()

    def card(self, pool: str) -> PoolCard | None:
        """The card of `pool`."""
        for c in self.query(PoolCard):
            if c.pool == pool:
                return c
        return None


class WorkerLogScreen(Screen[None]):
    """A worker's log, following new lines until closed."""

    BINDINGS = [Binding("escape,q", "dismiss", "Back")]

    def __init__(self, fleet: Any, pool: str, worker_id: str) -> None:
        super().__init__()
        self.fleet, self.pool, self.worker_id = fleet, pool, worker_id

    def compose(self) -> ComposeResult:
        yield Header()
        yield RichLog(id="worker-log", wrap=True, max_lines=5000)
        yield Footer()

    def on_mount(self) -> None:
        self.title = f"log of {self.worker_id} on {self.pool}"
        self.follow()

    @work(exclusive=True, exit_on_error=False, name="log:follow")
    async def follow(self) -> None:
        log = self.query_one(RichLog)
        try:
            async for line in self.fleet.log_lines(self.pool, self.worker_id):
                log.write(line)
        except RbeeError as exc:
            log.write(f"[log ended: {exc}]")


class ErrorLogScreen(Screen[None]):
    """Every error the dashboard reported, with its details."""

    BINDINGS = [Binding("escape,q", "dismiss", "Back")]

    def __init__(self, errors: list[tuple[float, str]]) -> None:
        super().__init__()
        self.errors = errors

    def compose(self) -> ComposeResult:
        yield Header()
        yield RichLog(id="error-log", wrap=True)
        yield Footer()

    def on_mount(self) -> None:
        log = self.query_one(RichLog)
        if not self.errors:
            log.write("No errors.")
        for at, text in self.errors:
            log.write(f"{time.strftime('%H:%M:%S', time.localtime(at))}  {text}")


HELP = """\
# rbee-tui

Pools are on the left; the selected pool's **Catalog**, **Downloads**, **Workers** and **Gauges** on the right.
Everything also works with the mouse, and **Ctrl+P** opens the command palette with every action.

| Key | Action |
|-----|--------|
| `1` `2` `3` `4` | Catalog, Downloads, Workers, Gauges |
| `d` | download the selected model |
| `v` | verify the selected model's files |
| `n` | register a model |
| `x` | unregister the selected model |
| `c` | cancel the selected download |
| `s` | spawn a worker |
| `k` | stop the selected worker |
| `l` | follow the selected worker's log |
| `p` | type a quick prompt to the selected worker |
| `o` | overview of every pool |
| `m` | the matrix job board (there: `a` all, `r` row, `c` column, `Enter` cell, `x` cancel, `f` retry, `e` export) |
| `a` / `E` | add a pool / edit the selected pool |
| `t` | switch theme (remembered) |
| `e` | error log |
| `r` | refresh |
| `q` | quit |
"""


class HelpScreen(Screen[None]):
    """Keys and what they do."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Back")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Markdown(HELP)
        yield Footer()
