"""The Clusters pane: models split over pools with llama.cpp RPC, each node's layers, share and memory."""

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

# The port is on this machine (the cluster's front, which watches requests): the coordinator's own port on the
# head is in the Workers pane.
CLUSTER_COLUMNS = ("Model", "State", "Head", "Port here", "Nodes", "Policy", "Context")
NODE_COLUMNS = ("Pool", "Layers", "Share", "Planned", "Node RAM now", "RPC port", "Role")


class ClustersPane(Vertical):
    """Clusters as a table, and the highlighted cluster's nodes below; `n` starts one, `k` stops it."""

    BINDINGS = [
        Binding("n", "new", "New cluster"),
        Binding("k", "stop", "Stop cluster"),
    ]
    HELP_TITLE = "Clusters (5)"
    EMPTY = "No clusters: press n to split a model over several pools (llama.cpp RPC)."

    class NewAsked(Message):
        """The user asked to start a cluster."""

    @dataclass
    class StopAsked(Message):
        """The user asked to stop the cluster of `model` (asks first)."""

        model: str

    @dataclass
    class Shown(Message):
        """The user moved to the cluster of `model`: its nodes should show."""

        model: str

    def compose(self) -> ComposeResult:
        yield Line("n new cluster  k stop  (nodes of the highlighted cluster below)", classes="pane-hint")
        yield Line(self.EMPTY, classes="pane-empty")
        yield DataTable(id="clusters", cursor_type="row", zebra_stripes=True)
        yield Line("", id="cluster-note")
        yield DataTable(id="cluster-nodes", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.query_one("#clusters", DataTable).add_columns(*CLUSTER_COLUMNS)
        self.query_one("#cluster-nodes", DataTable).add_columns(*NODE_COLUMNS)
        self.set_class(True, "-empty")

    def show(self, rows: Sequence[tuple[str, Sequence[str]]]) -> None:
        """Show the clusters."""
        sync_rows(self.query_one("#clusters", DataTable), rows)
        self.set_class(not rows, "-empty")

    def show_nodes(self, note: str, rows: Sequence[tuple[str, Sequence[str]]]) -> None:
        """Show the highlighted cluster's nodes and a line about it (its reason, its address)."""
        self.query_one("#cluster-note", Line).update(note)
        sync_rows(self.query_one("#cluster-nodes", DataTable), rows)

    def selected(self) -> str | None:
        """The highlighted cluster's model."""
        return cursor_key(self.query_one("#clusters", DataTable))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "clusters" and event.row_key.value is not None:
            self.post_message(self.Shown(event.row_key.value))

    def action_new(self) -> None:
        """Split a model over pools (a dialog that shows the plan first)."""
        self.post_message(self.NewAsked())

    def action_stop(self) -> None:
        """Stop the highlighted cluster (asks first)."""
        model = self.selected()
        if model is None:
            self.app.notify("no cluster here: n starts one", severity="warning")
            return
        self.post_message(self.StopAsked(model))
