"""The Workers pane: the selected pool's workers, a quick prompt and its streamed reply."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Input, Static

from rbee_tui.ui.widgets.line import Line
from rbee_tui.ui.widgets.tables import cursor_key, sync_rows

# State comes third: at 80 columns the table still shows what a worker is doing.
COLUMNS = ("ID", "Model", "State", "Backend", "GPU", "Port", "Uptime", "RSS", "VRAM", "Last tok/s")


class PromptInput(Input):
    """The quick prompt; Escape goes back to the workers table."""

    BINDINGS = [Binding("escape", "leave", "Back to the table")]

    def action_leave(self) -> None:
        """Give the focus back to the table."""
        self.screen.query_one("#workers", DataTable).focus()


class WorkersPane(Vertical):
    """Workers as a table; `k l p` act on the highlighted worker, `s` spawns one."""

    BINDINGS = [
        Binding("s", "spawn", "Spawn"),
        Binding("k", "stop", "Stop"),
        Binding("l", "log", "Log"),
        Binding("p", "prompt", "Prompt"),
    ]
    HELP_TITLE = "Workers (3)"
    _replied_to = ""  # the worker whose reply shows

    class SpawnAsked(Message):
        """The user asked to spawn a worker."""

    @dataclass
    class StopAsked(Message):
        """The user asked to stop `worker` (asks first)."""

        worker: str

    @dataclass
    class LogAsked(Message):
        """The user asked to follow `worker`'s log."""

        worker: str

    @dataclass
    class PromptSent(Message):
        """The user sent `text` to `worker`."""

        worker: str
        text: str

    def compose(self) -> ComposeResult:
        yield Line("s spawn  k stop  l log  p prompt", classes="pane-hint")
        yield Line("", classes="pane-empty")
        yield DataTable(id="workers", cursor_type="row", zebra_stripes=True)
        yield PromptInput(
            placeholder="quick prompt to the highlighted worker (Enter sends, Escape leaves)", id="prompt"
        )
        yield Static("", id="reply")

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*COLUMNS)

    def show(self, rows: Sequence[tuple[str, Sequence[str]]], empty: str = "") -> None:
        """Show the workers; `empty` says what to do when there are none (or why the pool shows nothing)."""
        sync_rows(self.query_one(DataTable), rows)
        if self._replied_to and self._replied_to not in {key for key, _ in rows}:
            self.reply("")  # the reply of a worker that is gone would read as this pool's
            self._replied_to = ""
        self.query_one(".pane-empty", Line).update(empty)
        self.set_class(bool(empty), "-empty")

    def reply(self, text: str, worker: str = "") -> None:
        """Show the quick prompt's reply so far (from `worker`)."""
        self._replied_to = worker or self._replied_to
        self.query_one("#reply", Static).update(text)

    def _worker(self) -> str | None:
        wid = cursor_key(self.query_one(DataTable))
        if wid is None or wid.startswith("spawning-"):
            self.app.notify("no worker here yet: s spawns one", severity="warning")
            return None
        return wid

    def action_spawn(self) -> None:
        """Spawn a worker (a dialog that explains what cannot run)."""
        self.post_message(self.SpawnAsked())

    def action_stop(self) -> None:
        """Stop the highlighted worker (asks first)."""
        if wid := self._worker():
            self.post_message(self.StopAsked(wid))

    def action_log(self) -> None:
        """Follow the highlighted worker's log."""
        if wid := self._worker():
            self.post_message(self.LogAsked(wid))

    def action_prompt(self) -> None:
        """Type a prompt for the highlighted worker."""
        if self._worker():
            self.query_one("#prompt", Input).focus()

    @on(Input.Submitted, "#prompt")
    def _sent(self, event: Input.Submitted) -> None:
        event.stop()
        if not event.value.strip():
            return
        if wid := self._worker():
            self.post_message(self.PromptSent(wid, event.value))
