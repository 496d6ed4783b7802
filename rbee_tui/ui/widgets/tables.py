"""Refreshing a DataTable from new data without rebuilding it when its rows are the same ones."""

from __future__ import annotations

from collections.abc import Sequence

from textual.coordinate import Coordinate
from textual.widgets import DataTable


def sync_rows(table: DataTable, rows: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Show `rows` (key, cells). When the keys are those shown, only the cells that changed are redrawn: a
    rebuilt table needs a layout pass of the whole screen, which every sample and pool switch would pay."""
    keys = [key for key, _ in rows]
    if keys and keys == [row.key.value for row in table.ordered_rows]:
        for r, (_, cells) in enumerate(rows):
            old = table.get_row_at(r)
            for c, value in enumerate(cells):
                if old[c] != value:
                    table.update_cell_at(Coordinate(r, c), value, update_width=True)
        return
    keep = table.cursor_row
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    if table.row_count:
        table.move_cursor(row=min(keep, table.row_count - 1))


def cursor_key(table: DataTable) -> str | None:
    """The key of the row under the cursor, or None when the table is empty."""
    if not table.row_count:
        return None
    return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
