"""The job board: the matrix as a grid (models x backend@pool) whose cells show state and tokens/s, live."""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Header, Static

from rbee_tui.errors import RbeeError
from rbee_tui.ui.format import duration

MARK = {
    "passed": "✅",
    "failed": "❌",
    "skipped": "⏭",
    "pool lost": "⚠",
    "cancelled": "⚠",
    "interrupted": "⚠",
    "queued": "…",
    "not run": "·",
}
STYLE = {
    "passed": "success",
    "failed": "error",
    "pool lost": "warning",
    "cancelled": "warning",
    "interrupted": "warning",
    "skipped": "text-muted",
}


class CellDetails(ModalScreen[None]):
    """A cell's measurements, timeline and log."""

    BINDINGS = [Binding("escape,i,q", "dismiss", "Close")]

    def __init__(self, details: dict[str, Any]) -> None:
        super().__init__()
        self.details = details

    def compose(self) -> ComposeResult:
        d = self.details
        lines = [f"{d['cell']}: {d['state']}" + (f" - {d['reason']}" if d.get("reason") else ""), ""]
        for k, v in sorted((d.get("measurements") or {}).items()):
            lines.append(f"  {k:<14} {v}")
        prev = d.get("previous")
        if prev and prev.get("avg_ts") and (d.get("measurements") or {}).get("avg_ts"):
            now = d["measurements"]["avg_ts"]
            lines.append(
                f"  vs last run   {prev['avg_ts']:.1f} -> {now:.1f} tok/s ({100 * (now / prev['avg_ts'] - 1):+.0f}%)"
            )
        if d.get("timeline"):
            t0 = d["timeline"][0]["at"]
            lines += ["", "timeline:"] + [
                f"  +{e['at'] - t0:7.2f}s  {e['state']}  {e['detail']}" for e in d["timeline"]
            ]
        if d.get("log_tail"):
            lines += ["", "worker log:", *("  " + ln for ln in d["log_tail"].splitlines())]
        with VerticalScroll(classes="dialog"):
            yield Static("\n".join(lines), id="cell-details")


class MatrixScreen(Screen[None]):
    """Run, watch, cancel and retry the matrix; export its tables."""

    BINDINGS = [
        Binding("escape", "dismiss", "Back"),
        Binding("a", "run_all", "Run all"),
        Binding("r", "run_row", "Run row"),
        Binding("c", "run_column", "Run column"),
        Binding("enter", "run_cell", "Run cell"),
        Binding("x", "cancel", "Cancel"),
        Binding("f", "retry_failed", "Retry failed"),
        Binding("delete,backspace", "clear", "Clear"),
        Binding("i", "details", "Details"),
        Binding("e", "export", "Export"),
    ]

    def __init__(self, board: Any) -> None:
        super().__init__()
        self.board = board
        self.columns: list[str] = []
        self.models: list[str] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("planning…", id="matrix-progress")
        yield DataTable(id="board", cursor_type="cell")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "matrix"
        if self.board.cells:
            self.render_board()
        else:
            self.plan()

    @work(exclusive=True, exit_on_error=False, name="matrix:plan")
    async def plan(self) -> None:
        try:
            await self.board.plan()
        except RbeeError as exc:
            self.app.notify(str(exc), severity="error")
        self.render_board()

    def _text(self, key: str) -> Text:
        job = self.board.jobs.get(key)
        cell = next((c for c in self.board.cells if c.key == key), None)
        state = (job or {}).get("state") or ("skipped" if cell and cell.skip else "not run")
        tps = ((job or {}).get("measurements") or {}).get("avg_ts")
        label = (
            f"{MARK.get(state, '⟳')} {tps:.1f} tok/s"
            if tps and state == "passed"
            else f"{MARK.get(state, '⟳')} {state}"
        )
        var = STYLE.get(state, "primary" if state not in ("not run", "queued") else "foreground")
        color = self.app.theme_variables.get(var) or self.app.theme_variables.get("foreground", "")
        return Text(label, style=color)

    def render_board(self) -> None:
        """Build the grid from the plan."""
        table = self.query_one("#board", DataTable)
        table.clear(columns=True)
        self.columns = list(dict.fromkeys(c.column for c in self.board.cells))
        self.models = list(dict.fromkeys(c.model for c in self.board.cells))
        table.add_column("model", key="model")
        for col in self.columns:
            table.add_column(col, key=col)
        for model in self.models:
            table.add_row(model, *[self._text(f"{model}@{col}") for col in self.columns], key=model)
        self.render_progress()

    def update_cell(self, key: str | None) -> None:
        """Redraw one cell in place (or the whole board when `key` is None)."""
        if key is None:
            self.render_board()
            return
        model, column = key.split("@", 1)
        if model in self.models and column in self.columns:
            self.query_one("#board", DataTable).update_cell(model, column, self._text(key))
        self.render_progress()

    def render_progress(self) -> None:
        c = self.board.counts()
        eta = self.board.eta_s()
        state = "running" if self.board.running else "idle"
        self.query_one("#matrix-progress", Static).update(
            f"{state}  {c['done']}/{c['total']} done  ✅ {c['passed']}  ❌ {c['failed']}  ⏭ {c['skipped']}  "
            f"⚠ {c['lost']}" + (f"  ETA {duration(eta)}" if eta is not None else "")
        )

    # -- selection and actions -----------------------------------------------------------------------------

    def _cursor(self) -> tuple[str | None, str | None]:
        table = self.query_one("#board", DataTable)
        if not table.row_count:
            return None, None
        row, col = table.cursor_coordinate
        model = self.models[row] if row < len(self.models) else None
        column = self.columns[col - 1] if 0 < col <= len(self.columns) else None
        return model, column

    def _start(self, cells: list[Any]) -> None:
        try:
            self.board.start(cells)
        except RbeeError as exc:
            self.app.notify(str(exc), severity="warning")
            return
        for cell in cells:
            self.update_cell(cell.key)

    def action_run_all(self) -> None:
        """Run every cell."""
        self._start(list(self.board.cells))

    def action_run_row(self) -> None:
        """Run the selected model everywhere."""
        model, _ = self._cursor()
        self._start([c for c in self.board.cells if c.model == model])

    def action_run_column(self) -> None:
        """Run every model on the selected backend@pool."""
        _, column = self._cursor()
        self._start([c for c in self.board.cells if c.column == column])

    def action_run_cell(self) -> None:
        """Run the selected cell."""
        model, column = self._cursor()
        self._start([c for c in self.board.cells if c.model == model and c.column == column])

    def action_retry_failed(self) -> None:
        """Run again every failed, lost or cancelled cell."""
        again = ("failed", "pool lost", "cancelled", "interrupted")
        self._start([c for c in self.board.cells if self.board.jobs.get(c.key, {}).get("state") in again])

    def action_cancel(self) -> None:
        """Cancel the run; its workers are stopped."""
        self.board.cancel()

    def action_clear(self) -> None:
        """Clear the board."""
        try:
            self.board.clear()
        except RbeeError as exc:
            self.app.notify(str(exc), severity="warning")

    def action_details(self) -> None:
        """Show the selected cell's details."""
        model, column = self._cursor()
        if model and column:
            self.app.push_screen(CellDetails(self.board.details(f"{model}@{column}")))

    def action_export(self) -> None:
        """Write md, csv, json and html of the current run."""
        from rbee_tui.config import data_dir

        out = data_dir() / "exports" / f"run-{self.board.run_id}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            paths = self.board.export(["md", "csv", "json", "html"], out)
        except RbeeError as exc:
            self.app.notify(str(exc), severity="warning")
            return
        self.app.notify(f"exported to {paths[0].parent}")
