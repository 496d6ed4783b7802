"""The gauges pane on its own: GPU gauges appear with the first sample that has GPUs, however fast samples come."""

from __future__ import annotations

import copy
from typing import Any

from textual.app import App, ComposeResult

from rbee_tui.hive.metrics import Sampler
from rbee_tui.sample import Sample
from rbee_tui.ui.widgets.gauges import Gauge, GaugesPane
from rbee_tui.ui.widgets.line import Line
from tests.support import waiting

GIB = 1 << 30


def with_gpus(sample: dict[str, Any], used_gib: int) -> dict[str, Any]:
    out = copy.deepcopy(sample)
    out["gpus"] = [
        {
            "index": i,
            "name": "GPU under test",
            "memory_total": 24 * GIB,
            "memory_used": used_gib * GIB,
            "util_percent": 40.0 + i,
            "temp_c": 55.0,
            "power_w": 200.0,
        }
        for i in range(2)
    ]
    return out


class PaneApp(App[None]):
    def compose(self) -> ComposeResult:
        yield GaugesPane(id="gauges")


async def test_gpu_gauges_take_samples_that_come_before_they_are_mounted() -> None:
    base = Sampler("test").sample()  # a real sample of this machine, with two GPUs added
    app = PaneApp()
    async with app.run_test(size=(120, 60)) as pilot:
        pane = app.query_one(GaugesPane)
        first, second = with_gpus(base, 5), with_gpus(base, 12)
        # Two samples in one go: the second reaches GPU gauges that were mounted for the first but not drawn yet.
        first, second = Sample.parse(first), Sample.parse(second)
        pane.render_sample(first, [first], 2)
        pane.render_sample(second, [first, second], 2)

        def vram_text() -> str:
            lines = list(app.query("#gpu1-vram .gauge-value").results(Line))
            return lines[0].text if lines else ""

        wanted = "12.0 GiB / 24.0 GiB"
        await waiting.until(lambda: vram_text().startswith(wanted), 10, "the GPU gauge's second reading", pilot.pause)
        assert len(app.query(Gauge)) == 7 + 8  # the node's seven, and four per GPU


class OneGauge(App[None]):
    def compose(self) -> ComposeResult:
        yield Gauge("CPU", warn=80.0, crit=90.0, id="g")


async def test_a_reading_at_a_threshold_does_not_flicker() -> None:
    app = OneGauge()
    async with app.run_test() as pilot:
        g = app.query_one(Gauge)
        g.show(81.0, "81%")  # a first reading past a threshold shows it at once
        await pilot.pause()
        assert g.has_class("-warn")
        steps = [(50.0, ""), (80.5, ""), (79.0, ""), (82.5, "-warn"), (79.0, "-warn"), (77.5, ""), (95.0, "-crit")]
        for percent, expected in steps:
            g.show(percent, f"{percent}%")
            await pilot.pause()
            shown = next((c for c in ("-warn", "-crit") if g.has_class(c)), "")
            assert shown == expected, (percent, shown)
        g.show(None, "not reported")
        assert g.has_class("-unknown") and not g.has_class("-crit")
