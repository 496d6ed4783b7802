"""Gauges of one pool: bars with numbers, colour by threshold, and sparklines of the recent history."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.css.query import NoMatches
from textual.widget import Widget
from textual.widgets import Label, ProgressBar, Sparkline, Static

from rbee_tui.sample import Sample
from rbee_tui.ui.format import gib, level, rate
from rbee_tui.ui.widgets.line import Line

HISTORY_POINTS = 120  # the sparkline shows the last two minutes at 1 Hz
LEVEL_MARGIN = 2.0  # percentage points past a threshold before a gauge changes colour back or forth


class Gauge(Widget):
    """One reading: its name, a bar, its value in words, and a sparkline of its history."""

    DEFAULT_CSS = """
    Gauge { height: 2; layout: vertical; }
    Gauge > Horizontal { height: 1; }
    Gauge .gauge-name { width: 14; }
    Gauge ProgressBar { width: 34; }
    Gauge .gauge-value { width: 1fr; }
    Gauge Sparkline { height: 1; margin-left: 14; width: 34; }
    """

    def __init__(self, name: str, warn: float = 80.0, crit: float = 90.0, id: str | None = None) -> None:
        super().__init__(id=id)
        self.label = name
        self._level: str | None = None  # the level shown, once there is one
        self.warn, self.crit = warn, crit
        self._reading: tuple[float | None, str, list[float]] | None = None

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield Label(self.label, classes="gauge-name")
            yield ProgressBar(total=100, show_eta=False, show_percentage=False)
            yield Line("unknown", classes="gauge-value")
        yield Sparkline([], summary_function=max)

    def on_mount(self) -> None:
        # A gauge mounted while samples flow may be given a reading before its children exist: draw it once
        # they do.
        self.call_after_refresh(self._redraw)

    def _redraw(self) -> None:
        if self._reading is not None:
            self.show(*self._reading)

    def show(self, percent: float | None, text: str, history: Iterable[float] = ()) -> None:
        """Render a reading: `percent` fills the bar (None means not reported), `text` says the numbers."""
        self._reading = (percent, text, list(history)[-HISTORY_POINTS:])
        try:
            bar = self.query_one(ProgressBar)
        except NoMatches:
            return  # not composed yet: on_mount draws the kept reading
        bar.update(progress=percent or 0.0)
        self.query_one(".gauge-value", Line).update(text)
        # Classes only when the level changes: each change re-applies the stylesheet to the gauge and its children.
        cls = "-unknown" if percent is None else level(percent, self.warn, self.crit)
        now = self._level
        if percent is not None and now not in (None, "-unknown") and cls != now:
            # A reading that hovers at a threshold keeps its colour until it is clearly past it: flipping every
            # sample flickers, and costs a stylesheet pass each time.
            near = {level(percent + d, self.warn, self.crit) for d in (-LEVEL_MARGIN, LEVEL_MARGIN)}
            cls = now if now in near else cls
        if cls != now:
            self._level = cls
            for name in ("-warn", "-crit", "-unknown"):
                self.set_class(name == cls, name)
        self.query_one(Sparkline).data = self._reading[2] or [0.0]


class GaugesPane(VerticalScroll):
    """All the gauges of the selected pool, redrawn from its latest sample and history."""

    def __init__(self, id: str | None = None) -> None:
        super().__init__(id=id)
        self._gpu_gauges: dict[str, Gauge] = {}
        self._gpu_layout: list[str] | None = None  # the GPU gauges mounted (ids); None until the first sample

    def compose(self) -> ComposeResult:
        yield Line("waiting for the first sample…", id="gauges-note")
        yield Gauge("RAM", id="g-ram")
        yield Gauge("Swap", warn=25, crit=60, id="g-swap")
        yield Gauge("CPU", id="g-cpu")
        yield Gauge("Load (1m)", warn=70, crit=100, id="g-load")
        yield Gauge("CPU temp", warn=80, crit=90, id="g-temp")
        yield Gauge("Disk I/O", warn=101, crit=101, id="g-disk")
        yield Gauge("Network", warn=101, crit=101, id="g-net")
        yield VerticalScroll(id="gpu-gauges")

    def render_sample(self, sample: Sample | None, history: Sequence[Sample], cpus: int, lost: str = "") -> None:
        """Redraw every gauge; `lost` says why the pool has no live readings (the gauges are then hidden)."""
        note = self.query_one("#gauges-note", Line)
        self.set_class(bool(lost), "-lost")
        text = lost or ("waiting for the first sample…" if sample is None else "")
        note.update(text)
        if note.display != bool(text):
            note.display = bool(text)  # an empty note would leave a blank line above the gauges
        if sample is None or lost:
            return
        ram, swap = sample.ram, sample.swap
        self.query_one("#g-ram", Gauge).show(
            ram.percent, f"{gib(ram.used)} / {gib(ram.total)}  {ram.percent:.0f}%", [h.ram.percent for h in history]
        )
        self.query_one("#g-swap", Gauge).show(
            swap.percent,
            f"{gib(swap.used)} / {gib(swap.total)}" if swap.total else "no swap",
            [h.swap.percent or 0.0 for h in history],
        )
        self.query_one("#g-cpu", Gauge).show(
            sample.cpu_percent, f"{sample.cpu_percent:.0f}% of {sample.cores} cores", [h.cpu_percent for h in history]
        )
        load = sample.load[0]
        self.query_one("#g-load", Gauge).show(
            min(100.0, 100.0 * load / max(cpus, 1)),
            f"{load:.2f} (5m {sample.load[1]:.2f}, 15m {sample.load[2]:.2f})",
            [100.0 * h.load[0] / max(cpus, 1) for h in history],
        )
        temp = sample.cpu_temp_c
        self.query_one("#g-temp", Gauge).show(
            temp,
            f"{temp:.0f} °C" if temp is not None else sample.cpu_temp_reason or "not reported",
            [h.cpu_temp_c or 0.0 for h in history],
        )
        read, write = sample.disk_read_bps, sample.disk_write_bps
        self.query_one("#g-disk", Gauge).show(
            None if read is None or write is None else min(100.0, (read + write) / 5e6),
            "not reported" if read is None or write is None else f"read {rate(read)}  write {rate(write)}",
            [(h.disk_read_bps or 0.0) + (h.disk_write_bps or 0.0) for h in history],
        )
        self.query_one("#g-net", Gauge).show(
            min(100.0, (sample.net_rx_bps + sample.net_tx_bps) / 1.25e6),
            f"in {rate(sample.net_rx_bps)}  out {rate(sample.net_tx_bps)}",
            [h.net_rx_bps + h.net_tx_bps for h in history],
        )
        self._render_gpus(sample, history)

    def _render_gpus(self, sample: Sample, history: Sequence[Sample]) -> None:
        box = self.query_one("#gpu-gauges", VerticalScroll)
        gpus = sample.gpus
        wanted = [f"gpu{g.index}-{kind}" for g in gpus for kind in ("vram", "util", "temp", "power")]
        # Our own record of what is mounted: the DOM lags behind a mount, and samples do not wait for it.
        if wanted != self._gpu_layout:
            box.remove_children()
            self._gpu_gauges = {}
            self._gpu_layout = wanted
            if not gpus:
                box.mount(Static(f"GPUs: {sample.gpus_reason or 'none'}", classes="gpu-reason"))
            for g in gpus:
                i = g.index
                for gauge in (
                    Gauge(f"GPU{i} VRAM", id=f"gpu{i}-vram"),
                    Gauge(f"GPU{i} util", warn=101, crit=101, id=f"gpu{i}-util"),
                    Gauge(f"GPU{i} temp", id=f"gpu{i}-temp"),
                    Gauge(f"GPU{i} power", warn=101, crit=101, id=f"gpu{i}-power"),
                ):
                    self._gpu_gauges[str(gauge.id)] = gauge
            box.mount_all(self._gpu_gauges.values())
        for n, g in enumerate(gpus):
            i = g.index
            past = [h.gpus[n] for h in history if len(h.gpus) > n]
            self._gpu_gauges[f"gpu{i}-vram"].show(
                g.memory_percent,
                f"{gib(g.memory_used)} / {gib(g.memory_total)}  {g.name}",
                [p.memory_percent or 0.0 for p in past],
            )
            util = g.util_percent
            self._gpu_gauges[f"gpu{i}-util"].show(
                util, "not reported" if util is None else f"{util:.0f}%", [p.util_percent or 0.0 for p in past]
            )
            temp = g.temp_c
            self._gpu_gauges[f"gpu{i}-temp"].show(
                temp, "not reported" if temp is None else f"{temp:.0f} °C", [p.temp_c or 0.0 for p in past]
            )
            power = g.power_w
            self._gpu_gauges[f"gpu{i}-power"].show(
                None if power is None else min(100.0, power / 7.0),
                "not reported" if power is None else f"{power:.0f} W",
                [p.power_w or 0.0 for p in past],
            )
