"""The capacity view: per cell, tokens/s against concurrency, memory predicted vs measured, and the slowdown of
models packed together; drawn from the job board's run (live, while a sweep runs) or the latest stored one."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from rich.table import Table
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Static, TabbedContent, TabPane
from textual.worker import Worker, WorkerState

from rbee_tui.catalog import human_size
from rbee_tui.errors import RbeeError
from rbee_tui.matrix.board import MatrixBoard
from rbee_tui.matrix.capacity_data import Capacity, CellCapacity, Packing
from rbee_tui.ui.widgets.capacity import CurvePlot, MemoryBars, PlotPanel

if TYPE_CHECKING:
    from rbee_tui.app import RbeeApp

SWEEP_EMPTY = (
    "No concurrency sweep yet. Run a sweep: on the job board (m) press n and type levels such as 1,2,4, then a "
    "(or Enter on a cell); headless: rbee-tui matrix run --concurrency 1,2,4. The curves grow here as it runs."
)
MEMORY_EMPTY = (
    "No memory prediction yet: a matrix cell records its predicted and measured memory when it runs. Run the "
    "matrix: on the job board (m) press a."
)
PACKING_EMPTY = (
    "No packing result yet: run one to see how models slow down together, e.g. "
    "rbee-tui capacity pack --pool local --models 'tiny-test*3'"
)


def _label(cell: CellCapacity, cells: tuple[CellCapacity, ...]) -> str:
    """A model's name where it names one cell, else the whole cell key (model@column)."""
    model = cell.key.split("@", 1)[0]
    return model if sum(c.key.split("@", 1)[0] == model for c in cells) == 1 else cell.key


def _sweep_note(cells: tuple[CellCapacity, ...]) -> Table:
    """A row per cell: its engine, what its top level gives against one stream, its time to first token."""
    table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    for name in ("cell", "engine", "streams", "aggregate", "TTFT p50/p95"):
        table.add_column(name, no_wrap=name != "cell")
    for c in cells:
        top = c.levels[-1]
        engine = (top.engine or "worker") + (f" ×{top.parallel}" if top.parallel > 1 else "")
        streams = f"{top.streams_ok}/{top.level}" if top.streams_ok < top.level else str(top.level)
        gain = f"{c.gain:.2f}x of 1" if c.gain is not None else f"{top.aggregate_tps:.1f} tok/s"
        ttft = (
            f"{top.ttft_p50_ms:.0f}/{top.ttft_p95_ms:.0f} ms"
            if top.ttft_p50_ms is not None and top.ttft_p95_ms is not None
            else "-"
        )
        table.add_row(c.key, engine, streams, gain, ttft)
    return table


def _packing_note(p: Packing) -> str:
    """A packing in a line: what was asked, what started against the prediction, and how the node took it."""
    asked = ", ".join(f"{n}× {m}" for m, n in Counter(p.models).items())
    parts = [f"{p.pool}, {asked}: {p.started} started ({p.predicted_count} predicted)"]
    if p.ram_used_peak is not None:
        parts.append(f"RAM peak {human_size(p.ram_used_peak)}")
    if p.swap_used_peak is not None:
        parts.append(f"swap {human_size(p.swap_used_peak) if p.swap_used_peak else 'none'}")
    if p.temps_peak_c is not None:
        parts.append(f"{p.temps_peak_c:.0f} °C")
    if p.cpu_freq_mhz is not None:
        parts.append(f"CPU clock {p.cpu_freq_mhz[0]:.0f}→{p.cpu_freq_mhz[1]:.0f} MHz")
    parts += [f"GPU {gpu} clock {idle:.0f}→{low:.0f} MHz" for gpu, idle, low in p.gpu_clock_mhz]
    return ", ".join(parts) + (f"; stopped: {p.refused}" if p.refused else "")


class CapacityScreen(Screen[None]):
    """How much a pool serves: concurrency curves, memory per model, packing slowdown."""

    BINDINGS = [
        Binding("escape", "dismiss", "Back"),
        Binding("1", "tab('sweep')", "Concurrency"),
        Binding("2", "tab('memory')", "Memory"),
        Binding("3", "tab('packing')", "Packing"),
    ]
    HELP_TITLE = "Capacity"
    HELP_INTRO = (
        "# Capacity\n\n**Concurrency**: aggregate and per-stream tokens/s of each cell at each level of its sweep "
        "(set the levels on the job board with `n`); the curves grow while a sweep runs. **Memory**: each model's "
        "predicted memory against what its worker used. **Packing**: how many times slower each model ran with "
        "N models on the pool at once. Without a run on the board, the latest stored run is shown.\n"
    )

    app: RbeeApp

    def __init__(self, board: MatrixBoard) -> None:
        super().__init__()
        self.board = board
        self.capacity = Capacity()  # what is drawn now
        self.stored: Capacity | None = None  # the latest stored run and the packing results, once read

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="capacity-source")
        with TabbedContent(id="capacity-tabs", initial="tab-sweep"):
            with TabPane("Concurrency", id="tab-sweep"):
                yield PlotPanel(
                    CurvePlot("aggregate tok/s", "streams at once", id="aggregate-plot"),
                    CurvePlot("per-stream tok/s", "streams at once", id="per-stream-plot"),
                    empty=SWEEP_EMPTY,
                    id="sweep-panel",
                )
            with TabPane("Memory", id="tab-memory"):
                yield PlotPanel(MemoryBars(id="memory-plot"), empty=MEMORY_EMPTY, id="memory-panel")
            with TabPane("Packing", id="tab-packing"):
                yield PlotPanel(
                    CurvePlot("slowdown (x) vs models at once", "models on the pool", even=False, id="slowdown-plot"),
                    empty=PACKING_EMPTY,
                    id="packing-panel",
                )
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.title = "capacity"
        self.draw(self.current())
        self.load_stored()
        # A run's last change can arrive while its task is still finishing: look once a second whether the
        # header's "running" still holds (no I/O: the board's task state).
        self.set_interval(1.0, self._check_running)

    def _check_running(self) -> None:
        if self._drawn_running != self.board.running:
            self.draw(self.current())

    @work(exclusive=True, exit_on_error=False, name="capacity:stored")
    async def load_stored(self) -> None:
        """Read the latest stored run and the packing results (SQLite stays off the screen's loop)."""
        try:
            self.stored = await asyncio.to_thread(self.board.stored_capacity)
        except RbeeError as exc:
            self.app.notify(f"could not read the stored results: {exc}", severity="warning")
            self.stored = Capacity(stored=True)
        self.draw(self.current())

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """A failed read is reported like any background failure (a worker's events stay on its screen), and the
        view stops saying it is reading."""
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.app.report(f"{event.worker.name} failed: {event.worker.error!r}")
            if self.stored is None:
                self.stored = Capacity(stored=True)
                self.draw(self.current())

    def current(self) -> Capacity:
        """The board's run while it runs or when it measured something; else the latest stored run."""
        live = self.board.capacity()
        stored = self.stored or Capacity()
        source = live if live.cells or self.board.running or self.stored is None else stored
        return Capacity(source.run_id, source.stored, source.cells, stored.packings)

    def matrix_changed(self, key: str | None) -> None:
        """The job board changed: redraw only when what the plots show changed (a new sweep level, a cell's
        memory), not on every state change of a cell."""
        now = self.current()
        if now != self.capacity:
            self.draw(now)

    _drawn_running = False  # whether the header said "running" when last drawn

    def draw(self, cap: Capacity) -> None:
        """Every plot, from `cap`."""
        self.capacity = cap
        self._drawn_running = self.board.running
        if cap.run_id is None:
            source = "no run with capacity data yet" if self.stored is not None else "reading the stored results…"
        else:
            source = f"run {cap.run_id}" + (", stored" if cap.stored else "")
            if self.board.running and not cap.stored:
                source += ", running"
        levels = ",".join(map(str, self.board.concurrency)) or "none"
        self.query_one("#capacity-source", Static).update(f"{source}   next run's concurrency levels: {levels}")
        self._draw_sweep(cap.swept)
        self._draw_memory(cap.memory)
        self._draw_packing(cap)

    def _draw_sweep(self, cells: tuple[CellCapacity, ...]) -> None:
        self.query_one("#aggregate-plot", CurvePlot).show(
            {c.key: [(lv.level, lv.aggregate_tps) for lv in c.levels] for c in cells}
        )
        self.query_one("#per-stream-plot", CurvePlot).show(
            {c.key: [(lv.level, lv.per_stream_tps) for lv in c.levels] for c in cells}
        )
        self.query_one("#sweep-panel", PlotPanel).set_empty(not cells, _sweep_note(cells))

    def _draw_memory(self, cells: tuple[CellCapacity, ...]) -> None:
        bars = [(_label(c, cells), c.predicted_bytes or 0, c.measured_bytes or 0) for c in cells]
        self.query_one("#memory-plot", MemoryBars).show(bars)
        note = "  ".join(
            f"{label}: {100 * (measured / predicted - 1):+.0f}%" for label, predicted, measured in bars if predicted
        )
        self.query_one("#memory-panel", PlotPanel).set_empty(not bars, f"measured vs predicted: {note}")

    def _draw_packing(self, cap: Capacity) -> None:
        # A point per number of workers on the pool (each step of each packing); a model alone runs at its own
        # speed (1.0x) where no step measured it alone.
        points: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        notes = []
        for p in cap.packings:
            for count, by_model in p.slowdowns().items():
                for model, slowdown in by_model.items():
                    points[f"{model}@{p.pool}"][count].append(slowdown)
            notes.append(_packing_note(p))
        for by_count in points.values():
            by_count.setdefault(1, [1.0])
        series = {
            model: [(float(n), sum(v) / len(v)) for n, v in sorted(by_count.items())]
            for model, by_count in points.items()
        }
        self.query_one("#slowdown-plot", CurvePlot).show(series)
        self.query_one("#packing-panel", PlotPanel).set_empty(not series, "\n".join(dict.fromkeys(notes)))

    def action_tab(self, tab: str) -> None:
        """Show a tab of the view."""
        self.query_one(TabbedContent).active = f"tab-{tab}"
