"""The pool list (name, state, one-line load) and the overview's compact pool cards."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Label, ListItem, ListView, ProgressBar, Static

from rbee_tui.ui.format import gib, level
from rbee_tui.ui.widgets.line import Line

STATE_MARK = {"connected": "●", "connecting": "◌", "reconnecting": "◌", "lost": "✖"}


def one_line(sample: dict[str, Any] | None) -> str:
    """A pool's load in one line: RAM, CPU and VRAM percentages."""
    if not sample:
        return "no sample yet"
    parts = [f"RAM {sample['ram']['percent']:.0f}%", f"CPU {sample['cpu']['percent']:.0f}%"]
    for g in sample.get("gpus") or []:
        if g.get("memory_total"):
            parts.append(f"GPU{g['index']} {100 * g['memory_used'] / g['memory_total']:.0f}%")
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

    def show(self, state: str, reason: str, sample: dict[str, Any] | None) -> None:
        """Render state and load."""
        self._name.update(f"{STATE_MARK.get(state, '?')} {self.pool}")
        self._line.update(one_line(sample) if state == "connected" else f"{state}: {reason}" if reason else state)
        self.set_class(state == "lost", "-lost")
        self.set_class(state in ("connecting", "reconnecting"), "-pending")


class PoolList(ListView):
    """Pools, one per row; selecting one shows its panes."""

    class Selected(Message):
        """The user picked a pool."""

        def __init__(self, pool: str) -> None:
            super().__init__()
            self.pool = pool

    def __init__(self, pools: list[str]) -> None:
        self._items = {p: PoolItem(p) for p in pools}  # looked up on every sample: a query each time was costly
        super().__init__(*self._items.values(), id="pools")

    def on_list_view_highlighted(self, event: ListView.Highlighted) -> None:
        if isinstance(event.item, PoolItem):
            self.post_message(self.Selected(event.item.pool))

    def item(self, pool: str) -> PoolItem | None:
        """The row of `pool`."""
        return self._items.get(pool)

    def add(self, pool: str) -> None:
        """Add a row for a new pool."""
        self._items[pool] = PoolItem(pool)
        self.append(self._items[pool])


class PoolCard(Vertical):
    """A compact pool for the overview: state, RAM and VRAM bars, workers."""

    def __init__(self, name: str) -> None:
        super().__init__(id=f"card-{name}", classes="pool-card")
        self.pool = name
        self.border_title = name

    def compose(self) -> ComposeResult:
        yield Label("connecting", classes="card-state")
        yield Label("RAM", classes="card-label")
        yield ProgressBar(total=100, show_eta=False, classes="card-ram")
        yield Label("VRAM", classes="card-label")
        yield ProgressBar(total=100, show_eta=False, classes="card-vram")
        yield Static("", classes="card-workers")

    def show(self, state: str, reason: str, sample: dict[str, Any] | None, workers: list[dict[str, Any]]) -> None:
        """Render the card (a card still being composed waits for the next sample)."""
        if not self.query(".card-state"):
            return
        self.query_one(".card-state", Label).update(state if not reason else f"{state}: {reason}")
        self.set_class(state == "lost", "-lost")
        ram = sample["ram"]["percent"] if sample else 0.0
        self.query_one(".card-ram", ProgressBar).update(progress=ram)
        labels = list(self.query(".card-label").results(Label))
        labels[0].update(f"RAM {gib(sample['ram']['used'])} / {gib(sample['ram']['total'])}" if sample else "RAM")
        self.set_class(level(ram, 80, 90) == "-crit", "-ram-crit")
        gpus = (sample or {}).get("gpus") or []
        used = sum(g.get("memory_used") or 0 for g in gpus)
        total = sum(g.get("memory_total") or 0 for g in gpus)
        self.query_one(".card-vram", ProgressBar).update(progress=100.0 * used / total if total else 0.0)
        labels[1].update(f"VRAM {gib(used)} / {gib(total)}" if total else "VRAM: no GPU")
        live = [w for w in workers if w.get("state") != "exited"]
        self.query_one(".card-workers", Static).update(
            f"{len(live)} worker(s): " + ", ".join(f"{w['id']} {w['state']}" for w in live) if live else "no workers"
        )
