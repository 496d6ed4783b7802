"""The dashboard opens on the local pool with tiny-test ready, and quits cleanly."""

from __future__ import annotations

from textual.widgets import DataTable

from rbee_tui.app import RbeeApp
from rbee_tui.config import Config


async def test_opens_on_the_local_pool_with_tiny_test() -> None:
    app = RbeeApp(Config())
    async with app.run_test(size=(120, 40)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        table = app.query_one("#catalog", DataTable)
        ids = [table.get_row_at(i)[0] for i in range(table.row_count)]
        assert ids == ["qwen-0.5b", "tinyllama", "phi3", "mistral", "tiny-test"]
        assert table.get_row("tiny-test")[4] == "yes"
        await pilot.press("q")
    assert app.return_code == 0
