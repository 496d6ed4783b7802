"""Screens that show things: the overview of every pool, a worker's log, the error log, help."""

from __future__ import annotations

import time
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Markdown, RichLog

from rbee_tui.errors import RbeeError
from rbee_tui.ui.widgets.pools import PoolCard


class OverviewScreen(Screen[None]):
    """Every pool side by side, as compact cards (Enter or a click opens one): for clusters of many machines."""

    BINDINGS = [Binding("escape,o", "dismiss", "Back")]
    HELP_TITLE = "Overview"

    def __init__(self, pools: list[str]) -> None:
        super().__init__()
        self.pools = pools

    def compose(self) -> ComposeResult:
        yield Header()
        with Grid(id="overview"):
            for p in self.pools:
                yield PoolCard(p)
        yield Footer(compact=True)  # the keys still fit at 80 columns

    def card(self, pool: str) -> PoolCard | None:
        """The card of `pool`."""
        for c in self.query(PoolCard):
            if c.pool == pool:
                return c
        return None


class WorkerLogScreen(Screen[None]):
    """A worker's log, following new lines until closed."""

    BINDINGS = [Binding("escape", "dismiss", "Back")]
    HELP_TITLE = "Worker log"

    def __init__(self, fleet: Any, pool: str, worker_id: str) -> None:
        super().__init__()
        self.fleet, self.pool, self.worker_id = fleet, pool, worker_id

    def compose(self) -> ComposeResult:
        yield Header()
        yield RichLog(id="worker-log", wrap=True, max_lines=5000)
        yield Footer(compact=True)  # the keys still fit at 80 columns

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

    BINDINGS = [Binding("escape", "dismiss", "Back")]
    HELP_TITLE = "Error log"

    def __init__(self, errors: list[tuple[float, str]]) -> None:
        super().__init__()
        self.errors = errors

    def compose(self) -> ComposeResult:
        yield Header()
        yield RichLog(id="error-log", wrap=True)
        yield Footer(compact=True)  # the keys still fit at 80 columns

    def on_mount(self) -> None:
        log = self.query_one(RichLog)
        if not self.errors:
            log.write("No errors.")
        for at, text in self.errors:
            log.write(f"{time.strftime('%H:%M:%S', time.localtime(at))}  {text}")


def _key(binding: Binding) -> str:
    names = {"question_mark": "?", "delete": "Delete", "backspace": "Backspace", "escape": "Escape", "enter": "Enter"}
    return " / ".join(f"`{names.get(k, k)}`" for k in binding.key.split(","))


def help_text(sections: list[tuple[str, list[Binding]]], intro: str = "") -> str:
    """Markdown tables of the keys that work where help was opened, section by section."""
    out = [intro]
    for title, bindings in sections:
        out += [f"## {title}", "", "| Key | Action |", "|-----|--------|"]
        out += [f"| {_key(b)} | {b.description} |" for b in bindings if isinstance(b, Binding)]
        out.append("")
    return "\n".join(out)


class HelpScreen(Screen[None]):
    """The keys that work on the screen it was opened from, and what they do."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Back")]

    def __init__(self, sections: list[tuple[str, list[Binding]]], intro: str = "") -> None:
        super().__init__()
        self.sections, self.intro = sections, intro

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="help-scroll"):  # focused: arrows, PageUp/PageDown, Home/End scroll it
            yield Markdown(help_text(self.sections, self.intro))
        yield Footer(compact=True)  # the keys still fit at 80 columns
