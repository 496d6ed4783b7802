"""One line of text that changes often (a gauge's value, the status line).

A `Label` asks for a layout pass of the whole screen on every update, since its width follows its text; with
32 pools sending a sample a second that pass was most of the dashboard's CPU. A `Line` has a size set by CSS,
so a new text only repaints its own row, and an unchanged text does nothing at all.
"""

from __future__ import annotations

from textual.content import Content
from textual.reactive import reactive
from textual.widget import Widget


class Line(Widget):
    """A single line of plain text (never markup: pool names and error reasons are shown as they are)."""

    DEFAULT_CSS = """
    Line { height: 1; width: 1fr; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    text: reactive[str] = reactive("", layout=False)

    def __init__(self, text: str = "", *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.set_reactive(Line.text, text)

    def update(self, text: str) -> None:
        """Show `text`; repaints only if it changed. Before the line is mounted it is kept for the first paint."""
        if self.is_mounted:
            self.text = text
        else:
            self.set_reactive(Line.text, text)

    def render(self) -> Content:
        return Content(self.text)
