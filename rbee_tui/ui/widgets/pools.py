"""The pool list (name, state, one-line load) and the overview's compact pool cards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Label, ListItem, ListView, ProgressBar, Static

from rbee_tui.sample import Sample
from rbee_tui.ui.format import gib, level
from rbee_tui.ui.widgets.line import Line

STATE_MARK = {"connected": "●", "connecting": "◌", "reconnecting": "◌", "lost": "✖"}


def one_line(sample: Sample | None) -> str:
    """A pool's load in one line: RAM, CPU and VRAM percentages."""
    if sample is None:
        return "no sample yet"
    parts = [f"RAM {sample.ram.percent:.0f}%", f"CPU {sample.cpu_percent:.0f}%"]
    parts += [f"GPU{g.index} {g.memory_percent:.0f}%" for g in sample.gpus if g.memory_percent is not None]
    return "  ".join(parts)


class PoolItem(ListItem):
    """One pool in the list."""

    def __init__(self, name: str) -> None:
        super().__init__(id=f"pool-{name}")
        self.pool = name
        # Held, not queried: a sample may arrive between this row's mount and its children's.
        self._name = Line(f"◌ {name}", classes="pool-name")
        self._line = Line("connecting", classes="pool-line")

    def compose(self) -> ComposeResult:
        yield self._name
        yield self._line

    def show(self, state: str, reason: str, sample: Sample | None) -> None:
        """Render state and load."""
        self._name.update(f"{STATE_MARK.get(state, '?')} {self.pool}")
        self._line.update(one_line(sample) if state == "connected" else f"{state}: {reason}" if reason else state)
        self.set_class(state == "lost", "-lost")
        self.set_class(state in ("connecting", "reconnecting"), "-pending")


class PoolList(ListView):
    """Pools, one per row; selecting one shows its panes."""

    @dataclass
    class PoolShown(Message):
        """The user moved to `pool`: its panes show. (Enter or a click then posts ListView.Selected, which moves
        the focus into the panes; ListView's own `Selected` is not redefined here, since ListView posts it.)"""

        pool: str

    ROW_HEIGHT = 2  # a PoolItem's height in the stylesheet

    @dataclass
    class RowsRevealed(Message):
        """Scrolling brought rows into view that were not drawn while hidden: `pools` need drawing."""

        pools: list[str]

    def __init__(self, pools: list[str]) -> None:
        self._items = {p: PoolItem(p) for p in pools}  # looked up on every sample: a query each time was costly
        self._hidden_stale: set[str] = set()  # rows updated while scrolled out of view
        super().__init__(*self._items.values(), id="pools")

    def on_mount(self) -> None:
        self.watch(self, "scroll_y", self._scrolled, init=False)

    def in_view(self, pool: str) -> bool:
        """Whether `pool`'s row is inside the list's window. A row out of it is not redrawn on each sample:
        updating a hidden row still made Textual rebuild its map of the screen, which a keypress waited for."""
        if not self.size.height or pool not in self._items:
            return True  # not laid out yet: draw everything
        top = list(self._items).index(pool) * self.ROW_HEIGHT  # rows are in the dict's order
        inside = self.scroll_y - self.ROW_HEIGHT < top < self.scroll_y + self.size.height
        if not inside:
            self._hidden_stale.add(pool)
        return inside

    def _scrolled(self) -> None:
        shown = [p for p in self._hidden_stale if self.in_view(p)]
        if shown:
            self._hidden_stale.difference_update(shown)
            self.post_message(self.RowsRevealed(shown))

    def on_list_view_highlighted(self, event: ListView.Highlighted) -> None:
        if isinstance(event.item, PoolItem):
            self.post_message(self.PoolShown(event.item.pool))

    def item(self, pool: str) -> PoolItem | None:
        """The row of `pool`."""
        return self._items.get(pool)

    def add(self, pool: str) -> None:
        """Add a row for a new pool."""
        self._items[pool] = PoolItem(pool)
        self.append(self._items[pool])


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
