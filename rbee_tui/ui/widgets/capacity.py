"""The capacity view's plots: curves against concurrency or co-resident models, and memory bars. Terminal plots
by Plotext, through Textual's own widget for it; each widget keeps the data it draws, so a test reads it."""

from __future__ import annotations

from rich.console import RenderableType
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Static
from textual_plotext import PlotextPlot
from textual_plotext.plot import Plot

Point = tuple[float, float]
MB = 1e6  # decimal, as the catalog and the exports say sizes
Y_LABELS = 8  # columns Plotext gives the y axis' numbers and line


def set_xticks(plt: Plot, ticks: list[float], labels: list[str]) -> None:
    """The lower x axis' ticks and labels, in this order. Plotext's own `xticks` dedups them through a set, whose
    order changes from one process to the next, and places each label around the ones already drawn: the same
    data then drew differently from run to run."""
    plt.monitor.xticks[0] = list(ticks)
    plt.monitor.xlabels[0] = list(labels)


class CurvePlot(PlotextPlot):
    """Lines of (x, y) points, one per label, each x labelled with its value; `even` spreads the x values evenly
    (levels 1, 2, 4, 8 read best that way)."""

    def __init__(self, title: str, xlabel: str, *, even: bool = True, id: str | None = None) -> None:
        super().__init__(id=id)
        self.plot_title = title
        self.xlabel = xlabel
        self.even = even
        self.series: dict[str, list[Point]] = {}

    def show(self, series: dict[str, list[Point]]) -> None:
        """Draw these lines (replacing what was drawn)."""
        self.series = {label: sorted(points) for label, points in series.items() if points}
        plt = self.plt
        plt.clear_figure()
        plt.title(self.plot_title)
        plt.xlabel(self.xlabel)
        xs = sorted({x for points in self.series.values() for x, _ in points})
        where = {x: float(i) if self.even else x for i, x in enumerate(xs)}
        top = max((y for points in self.series.values() for _, y in points), default=0.0)
        for label, points in self.series.items():
            plt.plot([where[x] for x, _ in points], [y for _, y in points], label=label, marker="braille")
        if xs:
            left, right = where[xs[0]], where[xs[-1]]
            margin = (right - left) * 0.05 or 1.0
            set_xticks(plt, [where[x] for x in xs], [f"{x:g}" for x in xs])
            plt.xlim(left - margin, right + margin)
            plt.ylim(0, top * 1.15 or 1)  # from zero: a ratio reads right only from zero
        self.refresh()


class MemoryBars(PlotextPlot):
    """Predicted against measured memory, a pair of bars per model."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.bars: list[tuple[str, int, int]] = []  # label, predicted bytes, measured bytes

    def show(self, bars: list[tuple[str, int, int]]) -> None:
        """Draw these pairs (replacing what was drawn)."""
        self.bars = list(bars)
        self.refresh()

    def render(self) -> RenderableType:
        # Built here, where the width is known: each label is cut to its pair's share of it.
        plt = self.plt
        plt.clear_figure()
        plt.title("memory per model: predicted vs measured (MB)")
        if self.bars:
            room = max((self.size.width - Y_LABELS) // len(self.bars) - 3, 3)
            labels = [label if len(label) <= room else label[: room - 1] + "…" for label, _, _ in self.bars]
            predicted = [round(p / MB, 1) for _, p, _ in self.bars]
            measured = [round(m / MB, 1) for _, _, m in self.bars]
            plt.multiple_bar(labels, [predicted, measured], labels=["predicted", "measured"])
            set_xticks(plt, list(range(1, len(labels) + 1)), labels)  # where multiple_bar puts the pairs
        return super().render()


class PlotPanel(Vertical):
    """Plots side by side with a note under them, or in their place a line that says how to get data."""

    def __init__(self, *plots: PlotextPlot, empty: str, id: str | None = None) -> None:
        super().__init__(id=id, classes="plot-panel -empty")
        self.plots = plots
        self.empty_text = empty

    def compose(self) -> ComposeResult:
        yield Static(self.empty_text, classes="plot-empty")
        with Horizontal(classes="plot-row"):
            yield from self.plots
        yield Static("", classes="plot-note")

    def set_empty(self, empty: bool, note: RenderableType = "") -> None:
        """Show the plots and their note, or the line that says how to get data."""
        self.set_class(empty, "-empty")
        self.query_one(".plot-note", Static).update(note)
