"""The Catalog pane: every model of the selected pool; its keys act on the highlighted model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable

from rbee_tui.ui.widgets.line import Line
from rbee_tui.ui.widgets.tables import cursor_key, sync_rows

# Whether a model is here comes right after its id, then its size and the memory a worker of it will hold
# (rbee_tui/capacity.py): at 80 columns that is what still shows.
COLUMNS = ("ID", "Downloaded", "Size", "Memory", "Name", "Arch", "On pools", "Backends")


class CatalogPane(Vertical):
    """The catalog as a table; `d v x` act on the highlighted model, `n` registers a new one."""

    BINDINGS = [
        Binding("d", "download", "Download"),
        Binding("v", "verify", "Verify"),
        Binding("n", "register", "Register"),
        Binding("x", "unregister", "Unregister"),
    ]
    HELP_TITLE = "Catalog (1)"

    @dataclass
    class DownloadAsked(Message):
        """The user asked to download `model`."""

        model: str

    @dataclass
    class VerifyAsked(Message):
        """The user asked to verify `model`'s files."""

        model: str

    @dataclass
    class UnregisterAsked(Message):
        """The user asked to unregister `model`."""

        model: str

    class RegisterAsked(Message):
        """The user asked to register a model."""

    def compose(self) -> ComposeResult:
        yield Line("d download  v verify  n register  x unregister", classes="pane-hint")
        yield Line("", classes="pane-empty")
        yield DataTable(id="catalog", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*COLUMNS)

    def show(self, rows: Sequence[tuple[str, Sequence[str]]], empty: str = "") -> None:
        """Show the models; `empty` says why there are none (a lost pool, nothing read yet)."""
        table = self.query_one(DataTable)
        sync_rows(table, rows)
        self.query_one(".pane-empty", Line).update(empty)
        self.set_class(bool(empty), "-empty")

    def _model(self) -> str | None:
        model = cursor_key(self.query_one(DataTable))
        if model is None:
            self.app.notify("no model here yet", severity="warning")
        return model

    def action_download(self) -> None:
        """Download the highlighted model."""
        if model := self._model():
            self.post_message(self.DownloadAsked(model))

    def action_verify(self) -> None:
        """Re-check the highlighted model's files."""
        if model := self._model():
            self.post_message(self.VerifyAsked(model))

    def action_unregister(self) -> None:
        """Unregister the highlighted model (asks first)."""
        if model := self._model():
            self.post_message(self.UnregisterAsked(model))

    def action_register(self) -> None:
        """Register a model (a form)."""
        self.post_message(self.RegisterAsked())
