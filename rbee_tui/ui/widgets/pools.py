"""The pool list (name, state, one-line load) and the overview's compact pool cards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.cache import LRUCache
from textual.containers import Vertical
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import Label, ProgressBar, Static

from rbee_tui.sample import Sample
from rbee_tui.ui.format import gib, level

STATE_MARK = {"connected": "●", "connecting": "◌", "reconnecting": "◌", "lost": "✖"}
PENDING = ("connecting", "reconnecting")


def one_line(sample: Sample | None) -> str:
    """A pool's load in one line: RAM, CPU and VRAM percentages."""
    if sample is None:
        return "no sample yet"
    parts = [f"RAM {sample.ram.percent:.0f}%", f"CPU {sample.cpu_percent:.0f}%"]
    parts += [f"GPU{g.index} {g.memory_percent:.0f}%" for g in sample.gpus if g.memory_percent is not None]
    return "  ".join(parts)


def _fit(text: str, width: int, pad: int) -> str:
    """`text` on one line of exactly `width` cells with `pad` blank cells each side, cut with an ellipsis."""
    # An error reason can span lines or hold tabs: a row shows its first line, as a one-line label would.
    text = text.split("\n", 1)[0].replace("\t", " ").replace("\r", "")
    inner = width - 2 * pad
    if inner <= 0:
        return " " * max(width, 0)
    if cell_len(text) > inner:
        text = set_cell_size(text, inner - 1) + "…"
    return " " * pad + set_cell_size(text, inner) + " " * pad


@dataclass(frozen=True)
class PoolRow:
    """What one pool's row shows: a state mark and the name, then its load or its state and why."""

    pool: str
    state: str = "connecting"
    detail: str = "connecting"

    @property
    def title(self) -> str:
        """The first line: state mark and name."""
        return f"{STATE_MARK.get(self.state, '?')} {self.pool}"

    @property
    def lines(self) -> tuple[str, str]:
        """Both lines, as the row shows them."""
        return self.title, self.detail


class PoolList(ScrollView, can_focus=True):
    """Pools, two lines each; moving through them shows a pool's panes, Enter or a click goes into them.

    One widget draws every row (Textual's line API): a sample redraws the two lines of its row, and only
    if that row is in the window. With a widget per row, 32 pools sending a sample a second kept Textual
    busy repainting and re-mapping widgets the user could not even see, and a keypress waited behind it.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "select", "Open pool", show=False),
        Binding("up,k", "cursor_up", "Previous pool", show=False),
        Binding("down,j", "cursor_down", "Next pool", show=False),
    ]
    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "pool-name",
        "pool-line",
        "pool-list--lost",
        "pool-list--pending",
        "pool-list--cursor",
        "pool-list--hover",
    }
    DEFAULT_CSS = """
    PoolList {
        background: $surface;
        overflow-x: hidden;
        & > .pool-list--cursor {
            color: $block-cursor-blurred-foreground;
            background: $block-cursor-blurred-background;
            text-style: $block-cursor-blurred-text-style;
        }
        & > .pool-list--hover {
            background: $block-hover-background;
        }
        &:focus {
            background-tint: $foreground 5%;
            & > .pool-list--cursor {
                color: $block-cursor-foreground;
                background: $block-cursor-background;
                text-style: $block-cursor-text-style;
            }
        }
    }
    """
    ROW_HEIGHT = 2
    PAD = 1  # blank cells each side of a row's text

    index: reactive[int | None] = reactive(None, init=False)
    """The highlighted row."""

    @dataclass
    class PoolShown(Message):
        """The user moved to `pool`: its panes show."""

        pool: str

    @dataclass
    class PoolEntered(Message):
        """Enter or a click on `pool`: the user goes into its panes."""

        pool: str

    def __init__(self, pools: list[str], *, id: str = "pools") -> None:
        super().__init__(id=id)
        self._order: list[str] = []  # row order
        self._rows: dict[str, PoolRow] = {}
        self._at: dict[str, int] = {}  # pool -> row number: looked up on every sample
        self._hover: int | None = None
        # Drawn lines, keyed by everything that changes how they look: a row redrawn unchanged costs a lookup.
        self._strips: LRUCache[tuple[Any, ...], Strip] = LRUCache(1024)
        for pool in pools:
            self._append(pool)

    # -- what the screen tells it --------------------------------------------------------------------------

    @property
    def pools(self) -> list[str]:
        """Every pool, in row order."""
        return list(self._order)

    def row(self, pool: str) -> PoolRow | None:
        """What `pool`'s row shows (None: no such row)."""
        return self._rows.get(pool)

    def show(self, pool: str, state: str, reason: str, sample: Sample | None) -> None:
        """Show `pool`'s state and load. Redraws its row only if that changed and the row is in view; a row
        out of view is drawn when scrolled to."""
        if pool not in self._rows:
            return
        detail = one_line(sample) if state == "connected" else f"{state}: {reason}" if reason else state
        row = PoolRow(pool, state, detail)
        if row != self._rows[pool]:
            self._rows[pool] = row
            self._refresh_row(self._at[pool])

    def add(self, pool: str) -> None:
        """Add a row for a new pool, at the end."""
        if pool not in self._rows:
            self._append(pool)
            self._set_virtual_size()

    def _append(self, pool: str) -> None:
        self._at[pool] = len(self._order)
        self._order.append(pool)
        self._rows[pool] = PoolRow(pool)

    # -- keys and the mouse --------------------------------------------------------------------------------

    def action_cursor_down(self) -> None:
        """Highlight the next pool."""
        if self._order:
            self.index = 0 if self.index is None else min(self.index + 1, len(self._order) - 1)

    def action_cursor_up(self) -> None:
        """Highlight the previous pool."""
        if self._order:
            self.index = len(self._order) - 1 if self.index is None else max(self.index - 1, 0)

    def action_select(self) -> None:
        """Go into the highlighted pool's panes."""
        if self.index is not None:
            self.post_message(self.PoolEntered(self._order[self.index]))

    def validate_index(self, index: int | None) -> int | None:
        """Keep the highlight on a row (None only when there are no rows)."""
        if index is None or not self._order:
            return None
        return min(max(index, 0), len(self._order) - 1)

    def watch_index(self, old: int | None, new: int | None) -> None:
        """Redraw the two rows that changed and keep the new one in view."""
        for i in (old, new):
            if i is not None:
                self._refresh_row(i)
        if new is not None:
            self._scroll_to_row(new)
            self.post_message(self.PoolShown(self._order[new]))

    def _row_at(self, event: events.MouseEvent) -> int | None:
        offset = event.get_content_offset(self)
        if offset is None:
            return None
        i = (offset.y + self.scroll_offset.y) // self.ROW_HEIGHT
        return i if 0 <= i < len(self._order) else None

    def on_click(self, event: events.Click) -> None:
        """A click highlights the pool and goes into its panes, as Enter does."""
        i = self._row_at(event)
        if i is None:
            return
        self.focus()
        self.index = i
        self.post_message(self.PoolEntered(self._order[i]))

    def on_mouse_move(self, event: events.MouseMove) -> None:
        """Shade the row under the mouse."""
        self._set_hover(self._row_at(event))

    def on_leave(self, _: events.Leave) -> None:
        self._set_hover(None)

    def _set_hover(self, i: int | None) -> None:
        if i != self._hover:
            old, self._hover = self._hover, i
            for row in (old, i):
                if row is not None:
                    self._refresh_row(row)

    # -- drawing -------------------------------------------------------------------------------------------

    def on_mount(self) -> None:
        self._set_virtual_size()

    def _set_virtual_size(self) -> None:
        size = Size(0, len(self._order) * self.ROW_HEIGHT)
        if size != self.virtual_size:
            self.virtual_size = size
            self._scroll_update(size)
            self.refresh()

    def notify_style_update(self) -> None:
        # The focus or the theme changed how rows look: draw them again.
        self.refresh()
        super().notify_style_update()

    def _refresh_row(self, i: int) -> None:
        """Mark row `i` for redrawing, if it is in the window (a row out of it is drawn when scrolled to)."""
        if not self.is_mounted or not self.size:
            return  # the first paint draws every row
        y = i * self.ROW_HEIGHT - self.scroll_offset.y
        if -self.ROW_HEIGHT < y < self.scrollable_content_region.height:
            self.refresh(Region(0, y, self.scrollable_content_region.width, self.ROW_HEIGHT))

    def _scroll_to_row(self, i: int) -> None:
        if not self.size:
            self.call_after_refresh(self._scroll_to_row, i)
            return
        region = Region(0, i * self.ROW_HEIGHT, self.scrollable_content_region.width, self.ROW_HEIGHT)
        self.scroll_to_region(region, animate=False, force=True, immediate=True)

    def render_line(self, y: int) -> Strip:
        """Line `y` of the window: half of a row, styled by its state, the highlight and the mouse."""
        width = self.scrollable_content_region.width
        i, part = divmod(self.scroll_offset.y + y, self.ROW_HEIGHT)
        if not 0 <= i < len(self._order):
            return Strip.blank(width, self.get_visual_style().rich_style)
        row = self._rows[self._order[i]]
        classes: tuple[str, ...] = (
            ("pool-list--cursor",) if i == self.index else ("pool-list--hover",) if i == self._hover else ()
        )
        if part:
            classes += ("pool-line",)
        elif row.state == "lost":
            classes += ("pool-name", "pool-list--lost")
        elif row.state in PENDING:
            classes += ("pool-name", "pool-list--pending")
        else:
            classes += ("pool-name",)
        text = row.lines[part]
        style = self.get_visual_style(*classes)  # cached by Textual, for the focus and theme of the moment
        key = (text, style, width)
        strip = self._strips.get(key)
        if strip is None:
            strip = Strip([Segment(_fit(text, width, self.PAD), style.rich_style)], width)
            self._strips[key] = strip
        return strip


class PoolCard(Vertical, can_focus=True):
    """A compact pool for the overview: state, RAM and VRAM bars, workers. Enter or a click opens the pool."""

    BINDINGS = [Binding("enter", "open", "Open pool")]

    @dataclass
    class Opened(Message):
        """The user opened `pool` from its card."""

        pool: str

    def __init__(self, name: str) -> None:
        super().__init__(id=f"card-{name}", classes="pool-card")
        self.pool = name
        self.border_title = name

    def action_open(self) -> None:
        """Show this pool's panes."""
        self.post_message(self.Opened(self.pool))

    def on_click(self) -> None:
        self.action_open()

    def compose(self) -> ComposeResult:
        yield Label("connecting", classes="card-state")
        yield Label("RAM", classes="card-label")
        yield ProgressBar(total=100, show_eta=False, classes="card-ram")
        yield Label("VRAM", classes="card-label")
        yield ProgressBar(total=100, show_eta=False, classes="card-vram")
        yield Static("", classes="card-workers")

    def show(self, state: str, reason: str, sample: Sample | None, workers: list[dict[str, Any]]) -> None:
        """Render the card (a card still being composed waits for the next sample); a pool that is not
        connected shows no readings rather than stale or zero ones."""
        if not self.query(".card-state"):
            return
        self.query_one(".card-state", Label).update(state if not reason else f"{state}: {reason}")
        self.set_class(state == "lost", "-lost")
        if state != "connected":
            sample = None
        ram = sample.ram.percent if sample else 0.0
        self.query_one(".card-ram", ProgressBar).update(progress=ram)
        labels = list(self.query(".card-label").results(Label))
        labels[0].update(f"RAM {gib(sample.ram.used)} / {gib(sample.ram.total)}" if sample else "RAM: no reading")
        self.set_class(level(ram, 80, 90) == "-crit", "-ram-crit")
        gpus = sample.gpus if sample else ()
        used = sum(g.memory_used or 0 for g in gpus)
        total = sum(g.memory_total or 0 for g in gpus)
        self.query_one(".card-vram", ProgressBar).update(progress=100.0 * used / total if total else 0.0)
        labels[1].update(f"VRAM {gib(used)} / {gib(total)}" if total else "VRAM: no GPU" if sample else "VRAM")
        live = [w for w in workers if w.get("state") != "exited"]
        self.query_one(".card-workers", Static).update(
            f"{len(live)} worker(s): " + ", ".join(f"{w['id']} {w['state']}" for w in live) if live else "no workers"
        )
