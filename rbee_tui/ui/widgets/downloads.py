"""The Downloads pane: one row per download with a progress bar, bytes, speed and ETA; results stay listed."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.widgets import Label, ListItem, ListView, ProgressBar

from rbee_tui.catalog import human_size
from rbee_tui.ui.format import duration, rate


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


class DownloadsPane(ListView):
    """All downloads of this session, newest last."""

    def show(self, d: Any) -> None:
        """Add or update the row of a download."""
        for item in self.query(DownloadItem):
            if item.key == d.key:
                item.show(d)
                return
        item = DownloadItem(d.key)
        self.append(item)
        self.call_after_refresh(item.show, d)

    def selected_key(self) -> str | None:
        """The highlighted download."""
        item = self.highlighted_child
        return item.key if isinstance(item, DownloadItem) else None
