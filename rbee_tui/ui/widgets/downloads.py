"""The Downloads pane: one row per download with a progress bar, bytes, speed and ETA; results stay listed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Label, ListItem, ListView, ProgressBar

from rbee_tui.catalog import human_size
from rbee_tui.ui.format import duration, rate
from rbee_tui.ui.widgets.line import Line


class DownloadItem(ListItem):
    """One download."""

    def __init__(self, key: str) -> None:
        super().__init__(id=f"dl-{key.replace('/', '--').replace('.', '_')}")
        self.key = key

    def compose(self) -> ComposeResult:
        yield Label(self.key, classes="dl-title")
        yield ProgressBar(total=100, show_eta=False)
        yield Label("", classes="dl-stats")

    def show(self, d: Any) -> None:
        """Render a Download."""
        self.query_one(".dl-title", Label).update(f"{d.model} on {d.pool}: {d.state}")
        bar = self.query_one(ProgressBar)
        if d.bytes_total:
            bar.update(total=d.bytes_total, progress=d.bytes_done)
        if d.state in ("running", "starting"):
            stats = (
                f"{human_size(d.bytes_done)} / {human_size(d.bytes_total)}  {rate(d.speed_bps)}  "
                f"ETA {duration(d.eta_s)}"
            )
        elif d.state == "done":
            stats = f"done: {human_size(d.bytes_total)}"
        else:
            stats = d.error
        self.query_one(".dl-stats", Label).update(stats)
        for state in ("running", "done", "failed", "cancelled"):
            self.set_class(d.state == state, f"-{state}")


class DownloadsPane(Vertical):
    """All downloads of this session, newest last; `c` cancels the highlighted one."""

    BINDINGS = [Binding("c", "cancel", "Cancel download")]
    HELP_TITLE = "Downloads (2)"
    EMPTY = "No downloads yet: press 1 for the catalog, pick a model, then d."

    @dataclass
    class CancelAsked(Message):
        """The user asked to cancel the download `key` (pool/model)."""

        key: str

    def compose(self) -> ComposeResult:
        yield Line("c cancel the highlighted download (its bytes stay for a resume)", classes="pane-hint")
        yield Line(self.EMPTY, classes="pane-empty")
        yield ListView(id="downloads-list")

    def on_mount(self) -> None:
        self.set_class(True, "-empty")

    def show(self, d: Any) -> None:
        """Add or update the row of a download."""
        items = self.query_one(ListView)
        for item in items.query(DownloadItem):
            if item.key == d.key:
                item.show(d)
                return
        item = DownloadItem(d.key)
        items.append(item)
        self.set_class(False, "-empty")
        if items.index is None:  # something to act on at once: `c` needs no cursor moves first
            items.index = len(items) - 1
        self.call_after_refresh(item.show, d)

    def selected_key(self) -> str | None:
        """The highlighted download."""
        item = self.query_one(ListView).highlighted_child
        return item.key if isinstance(item, DownloadItem) else None

    def action_cancel(self) -> None:
        """Cancel the highlighted download."""
        key = self.selected_key()
        if key is None:
            self.app.notify("no download to cancel", severity="warning")
            return
        self.post_message(self.CancelAsked(key))
