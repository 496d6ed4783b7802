"""The job board: the matrix as a grid (models x backend@pool) whose cells show state and tokens/s, live."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rich.text import Text
from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.coordinate import Coordinate
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Header, Input, Label, Static

from rbee_tui.catalog import human_size
from rbee_tui.errors import RbeeError
from rbee_tui.matrix.board import MatrixBoard
from rbee_tui.matrix.capacity_data import parse_levels
from rbee_tui.ui.format import duration
from rbee_tui.ui.screens.dialogs import Dialog

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


def _human(key: str, value: Any) -> str:
    """A measurement as a person reads it: sizes in MiB/GiB, times with their unit."""
    if value is None:
        return "-"
    if key == "concurrency" and isinstance(value, list):  # the sweep: one level per line
        return "".join(
            f"\n    x{lv.get('level')}: {lv.get('aggregate_tps') or 0:.1f} tok/s in all, "
            f"{lv.get('per_stream_tps') or 0:.1f} per stream, ttft p50 {lv.get('ttft_p50_ms') or 0:.0f} ms, "
            f"p95 {lv.get('ttft_p95_ms') or 0:.0f} ms, {lv.get('streams_ok')}/{lv.get('level')} streams"
            for lv in value
            if isinstance(lv, dict)
        )
    if key == "nodes" and isinstance(value, list):  # a cluster cell: one node per line
        return "".join(
            f"\n    {n.get('pool')}: {100 * (n.get('share') or 0):.0f}%, planned "
            f"{human_size(int(n.get('planned_bytes') or 0))}, peak RAM used {_human('b', n.get('peak_ram_used'))}"
            for n in value
            if isinstance(n, dict)
        )
    sized = key in ("b", "model_size", "peak_rss", "peak_vram", "peak_ram_used") or key.endswith("_bytes")
    if sized and isinstance(value, int | float):
        return human_size(int(value))
    if key.endswith("_s") and isinstance(value, int | float):
        return f"{value:.2f} s"
    if key.endswith("_ms") and isinstance(value, int | float):
        return f"{value:.0f} ms"
    if key.endswith("_ts") and isinstance(value, int | float):
        return f"{value:.1f} tok/s"
    if key.endswith("_c") and isinstance(value, int | float):
        return f"{value:.0f} °C"
    return str(value)


class BoardTable(DataTable[Any]):
    """The grid; a click on a cell runs it, as Enter does (Textual's table selects only on a second click)."""

    async def _on_click(self, event: events.Click) -> None:
        # Textual runs DataTable's own click handler after this one (handlers run for every class of the MRO):
        # it moves the cursor, and selects only if the cursor was there already. Select the other clicks once
        # the cursor has moved.
        meta = event.style.meta
        row, column = meta.get("row", -1), meta.get("column", -1)
        if row >= 0 and column >= 0 and Coordinate(row, column) != self.cursor_coordinate:
            self.call_later(self._post_selected_message)


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
            lines.append(f"  {k:<14} {_human(k, v)}")
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
        lines += ["", "worker log (last lines):"]
        lines += [("  " + ln) for ln in (d.get("log_tail") or "").splitlines()] or ["  (none: the cell did not run)"]
        with VerticalScroll(classes="dialog"):
            yield Static("\n".join(lines), id="cell-details")


class MatrixScreen(Screen[None]):
    """Run, watch, cancel and retry the matrix; export its tables."""

    BINDINGS = [
        Binding("escape", "dismiss", "Back"),
        Binding("a", "run_all", "Run all"),
        Binding("g", "capacity", "Capacity"),  # early: the footer shows what fits, in this order
        Binding("r", "run_row", "Run row", show=False),  # in help and the palette: the footer fits 80 columns
        Binding("c", "run_column", "Run column", show=False),
        Binding("enter", "run_cell", "Run cell", show=False),
        Binding("x", "cancel", "Cancel run"),
        Binding("f", "retry_failed", "Retry failed"),
        Binding("i", "details", "Details"),
        Binding("e", "export", "Export"),
        Binding("delete,backspace", "clear", "Clear", show=False),  # asks first
        Binding("n", "concurrency", "Concurrency", show=False),
    ]
    HELP_TITLE = "Job board"
    HELP_INTRO = (
        "# The job board\n\nRows are models, columns backend@pool. `a` starts a new run of every cell; `r`, `c`, "
        "`Enter` or a click run a row, a column or a cell again inside the current run (in place: the board, the "
        "details, the store and the exports show one job per cell). Results stay stored: `rbee-tui matrix runs`.\n\n"
        "`n` sets the concurrency levels the next runs sweep (e.g. 1,2,4: after its test, each cell runs that many "
        "streams at once against its worker); `g` shows the curves, growing while the sweep runs.\n"
    )

    def __init__(self, board: MatrixBoard) -> None:
        super().__init__()
        self.board = board
        self.columns: list[str] = []
        self.models: list[str] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("planning…", id="matrix-progress")
        yield BoardTable(id="board", cursor_type="cell")
        yield Footer(compact=True)  # the keys still fit at 80 columns

    def on_mount(self) -> None:
        self.title = "matrix"
        if self.board.cells:
            self.render_board()
        else:
            self.plan()

    def on_screen_resume(self) -> None:
        """Shown again (after the capacity view or a dialog): the cells that changed meanwhile."""
        if self.board.cells:
            self.render_board()

    @work(exclusive=True, exit_on_error=False, name="matrix:plan")
    async def plan(self) -> None:
        try:
            await self.board.plan()
        except RbeeError as exc:
            self.app.notify(str(exc), severity="error")
        self.render_board()

    def _text(self, key: str) -> Text:
        job = self.board.jobs.get(key)
        state = self.board.state(key)
        tps = job.measurements.get("avg_ts") if job is not None else None
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
        keep = table.cursor_coordinate
        table.clear(columns=True)
        self.columns = list(dict.fromkeys(c.column for c in self.board.cells))
        self.models = list(dict.fromkeys(c.model for c in self.board.cells))
        table.add_column("model", key="model")
        for col in self.columns:
            table.add_column(col, key=col)
        for model in self.models:
            table.add_row(model, *[self._text(f"{model}@{col}") for col in self.columns], key=model)
        if table.row_count:  # the cursor stays where the user left it
            table.move_cursor(row=min(keep.row, table.row_count - 1), column=min(keep.column, len(self.columns)))
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
            f"{state}  {c['done']}/{c['total']} done  ✅ {c['passed']} passed  ❌ {c['failed']} failed  "
            f"⏭ {c['skipped']} skipped  ⚠ {c['pool lost']} pool lost  ⚠ {c['cancelled']} cancelled"
            + (f"  ETA {duration(eta)}" if eta is not None else "")
            + (f"  sweep {','.join(map(str, self.board.concurrency))}" if self.board.concurrency else "")
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

    def _start(self, cells: list[Any], new_run: bool = False) -> None:
        try:
            self.board.start(cells, new_run=new_run)
        except RbeeError as exc:
            self.app.notify(str(exc), severity="warning")
            return
        for cell in cells:
            self.update_cell(cell.key)

    def action_run_all(self) -> None:
        """Run every cell, as a new run (its details compare each cell with the run before)."""
        self._start(list(self.board.cells), new_run=True)

    def action_run_row(self) -> None:
        """Run the selected model everywhere."""
        model, _ = self._cursor()
        self._start([c for c in self.board.cells if c.model == model])

    def action_run_column(self) -> None:
        """Run every model on the selected backend@pool."""
        _, column = self._cursor()
        self._start([c for c in self.board.cells if c.column == column])

    def action_run_cell(self) -> None:
        """Run the selected cell (on the model's name: its whole row)."""
        model, column = self._cursor()
        if column is None:
            self.action_run_row()
            return
        self._start([c for c in self.board.cells if c.model == model and c.column == column])

    def on_data_table_cell_selected(self, event: DataTable.CellSelected) -> None:
        """Enter or a click on a cell runs it."""
        event.stop()
        self.action_run_cell()

    def action_retry_failed(self) -> None:
        """Run again every failed, lost or cancelled cell."""
        self._start(self.board.retry_cells())

    def action_cancel(self) -> None:
        """Cancel the run; its workers are stopped."""
        if not self.board.running:
            self.app.notify("no run is going", severity="warning")
            return
        self.board.cancel()

    def action_clear(self) -> None:
        """Clear the board (asks first; the results stay in the store)."""
        if self.board.running:
            self.app.notify("cancel the run before clearing the board (x)", severity="warning")
            return

        def clear() -> None:
            try:
                self.board.clear()
            except RbeeError as exc:
                self.app.notify(str(exc), severity="warning")

        self.app.confirm("Clear the board? The results stay stored (rbee-tui matrix runs lists them).", "Clear", clear)

    def action_details(self) -> None:
        """Show the selected cell's details."""
        model, column = self._cursor()
        if model and column:
            self.show_details(f"{model}@{column}")
        else:
            self.app.notify("pick a cell first (→ moves from the model names to the cells)", severity="warning")

    @work(exclusive=True, exit_on_error=False, name="matrix:details")
    async def show_details(self, key: str) -> None:
        details = await asyncio.to_thread(self.board.details, key)  # SQLite reads stay off the screen's loop
        await self.app.push_screen(CellDetails(details))

    @work(exclusive=True, exit_on_error=False, name="matrix:export")
    async def action_export(self) -> None:
        """Write md, csv, json and html of the current run."""
        from rbee_tui.config import data_dir

        out = data_dir() / "exports" / f"run-{self.board.run_id}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            paths = await asyncio.to_thread(self.board.export, ["md", "csv", "json", "html"], out)
        except RbeeError as exc:
            self.app.notify(str(exc), severity="warning")
            return
        self.app.notify(f"exported to {paths[0].parent}")

    # -- the capacity lab ----------------------------------------------------------------------------------

    def action_capacity(self) -> None:
        """The capacity view: the sweep's curves (live while it runs), memory per model, packing."""
        self.app.open_capacity()

    @work(exclusive=True, exit_on_error=False, name="matrix:concurrency")
    async def action_concurrency(self) -> None:
        """Set the concurrency levels the next runs sweep (saved in the config's [matrix])."""
        levels = await self.app.push_screen_wait(ConcurrencyDialog(self.board.concurrency))
        if levels is None:
            return
        try:
            await asyncio.to_thread(self.board.set_concurrency, levels)  # the config file stays off the loop
        except (RbeeError, OSError) as exc:
            self.app.notify(f"could not save the concurrency levels: {exc}", severity="error")
            return
        self.render_progress()
        self.app.notify(
            f"the next runs sweep {','.join(map(str, levels))} streams at once" if levels else "no sweep from now on"
        )


class ConcurrencyDialog(Dialog):
    """The concurrency levels of the next runs' sweep, typed as "1,2,4"; checked before it closes."""

    def __init__(self, levels: tuple[int, ...]) -> None:
        super().__init__()
        self.levels = levels

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Concurrency sweep", classes="dialog-title")
            yield Static(
                "After its test, each cell runs N streams at once against its worker, for each level N, and records "
                "aggregate and per-stream tokens/s and time to first token. Empty: no sweep.",
                classes="field-label",
            )
            yield from self.field(
                "Levels", Input(",".join(map(str, self.levels)), placeholder="1,2,4,8", id="concurrency-levels")
            )
            yield from self.buttons("Save")

    def on_mount(self) -> None:
        self.query_one("#concurrency-levels", Input).focus()

    def submit(self) -> None:
        try:
            levels = parse_levels(self.query_one("#concurrency-levels", Input).value)
        except RbeeError as exc:
            self.error(str(exc))
            return
        self.dismiss(levels)
