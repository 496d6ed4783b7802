"""The capacity lab's results in the exports: concurrency sweeps and packings as Markdown tables, CSV files and
inline SVG charts for the HTML page (drawn here, so the page needs no script and no network to show them)."""

from __future__ import annotations

import csv
import html
import io
import math
from typing import Any

from rbee_tui.catalog import human_size

# Series colours, in order; the first is the one a test looks for in a screenshot of the page.
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
LEVEL_COLUMNS = (
    "model",
    "pool",
    "backend",
    "engine",
    "parallel",
    "level",
    "streams_ok",
    "aggregate_tps",
    "per_stream_tps",
    "ttft_p50_ms",
    "ttft_p95_ms",
)
PACKING_COLUMNS = (
    "pool",
    "count",
    "model",
    "worker",
    "alone_tps",
    "together_tps",
    "slowdown",
    "rss_bytes",
    "predicted_bytes",
)


def _size(n: Any) -> str:
    return human_size(int(n)) if n else "n/a"


# -- data ---------------------------------------------------------------------------------------------------


def levels(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per sweep level of every job that has one."""
    out = []
    for j in jobs:
        for entry in j["measurements"].get("concurrency") or []:
            row = {"model": j["model"], "pool": j["pool"], "backend": j["backend"]}
            out.append({**row, **{k: entry.get(k) for k in LEVEL_COLUMNS if k not in row}})
    return out


def slowdown(worker: dict[str, Any]) -> float | None:
    """How many times slower a worker was among the others than alone (None when it gave nothing together)."""
    return worker["alone_tps"] / worker["together_tps"] if worker.get("together_tps") else None


def steps(packing: dict[str, Any]) -> list[dict[str, Any]]:
    """A packing's measurements by number of co-resident workers: its steps, or its final state alone."""
    return packing.get("steps") or [{"count": packing["started"], "workers": packing["workers"]}]


def packing_rows(packings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per worker of every step of every packing."""
    out = []
    for p in packings:
        final = {w["worker"]: w for w in p["workers"]}
        for step in steps(p):
            for w in step["workers"]:
                full = {**final.get(w["worker"], {}), **w}
                down = slowdown(full)
                out.append(
                    {
                        "pool": p["pool"],
                        "count": step["count"],
                        **{k: full.get(k) for k in PACKING_COLUMNS if k not in ("pool", "count", "slowdown")},
                        "slowdown": round(down, 3) if down else None,
                    }
                )
    return out


def memory_points(jobs: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(label, predicted, measured) per cell that has both: measured is the worker's peak RSS, or on a GPU its
    peak VRAM, as the prediction is of one or the other (rbee_tui/capacity.py)."""
    out = []
    for j in jobs:
        m = j["measurements"]
        measured = m.get("peak_rss") if j["backend"].split("/")[0] == "cpu" else m.get("peak_vram")
        if m.get("predicted_bytes") and measured:
            out.append((f"{j['model']} {j['backend']}@{j['pool']}", int(m["predicted_bytes"]), int(measured)))
    return out


# -- Markdown and CSV ---------------------------------------------------------------------------------------


def markdown(jobs: list[dict[str, Any]], packings: list[dict[str, Any]]) -> list[str]:
    """The Concurrency and Packing sections (no lines when the run has neither)."""
    lines: list[str] = []
    swept = [j for j in jobs if j["measurements"].get("concurrency")]
    if swept:
        lines += [
            "",
            "## Concurrency",
            "",
            "Simultaneous streaming requests against one worker; time to first token counts the wait in the queue, "
            "per-stream tokens/s is each stream's tokens over its own time (median), aggregate is every token of "
            "the level over its wall time.",
            "",
            "| model | pool | backend | engine | parallel | level | streams ok | aggregate_ts | per_stream_ts "
            "| ttft_p50_ms | ttft_p95_ms | aggregate vs 1 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for j in swept:
            entries = j["measurements"]["concurrency"]
            base = next((e["aggregate_tps"] for e in entries if e["level"] == 1), None)
            for e in entries:
                ratio = f"{e['aggregate_tps'] / base:.2f}x" if base else "n/a"
                lines.append(
                    f"| {j['model']} | {j['pool']} | {j['backend']} | {e['engine']} | {e['parallel']} | "
                    f"{e['level']} | {e['streams_ok']}/{e['level']} | {e['aggregate_tps']:.1f} | "
                    f"{e['per_stream_tps']:.1f} | {e['ttft_p50_ms']:.1f} | {e['ttft_p95_ms']:.1f} | {ratio} |"
                )
    for p in packings:
        lines += [
            "",
            f"## Packing: {p['pool']}",
            "",
            f"Models in order: {', '.join(p['models'])}. Budget for workers {_size(p['budget_bytes'])}: "
            f"{p['predicted_count']} predicted to fit, {p['started']} started"
            + (f"; refused: {p['refused']}" if p["refused"] else "")
            + ".",
            "",
            "| workers | model | worker | alone tok/s | together tok/s | slowdown | RSS | predicted |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in packing_rows([p]):
            down = f"{r['slowdown']:.2f}x" if r["slowdown"] else "n/a"
            lines.append(
                f"| {r['count']} | {r['model']} | {r['worker']} | {r['alone_tps']:.1f} | {r['together_tps']:.1f} | "
                f"{down} | {_size(r['rss_bytes'])} | {_size(r['predicted_bytes'])} |"
            )
        lines += ["", *(f"- {line}" for line in node_lines(p))]
    return lines


def node_lines(p: dict[str, Any]) -> list[str]:
    """What the node went through during a packing, in words."""
    temp = p.get("temps_peak_c")
    out = [
        f"RAM used at peak {_size(p['ram_used_peak'])}; swap used at peak {_size(p['swap_used_peak'])}; "
        f"swapped in and out {_size(p['swap_in_out_bytes']) if p['swap_in_out_bytes'] is not None else 'n/a'}",
        f"hottest {f'{temp:.0f} °C' if temp is not None else 'n/a (no sensor)'}",
    ]
    freq = p.get("cpu_freq_mhz")
    out.append(
        f"CPU clock {freq['idle']:.0f} MHz idle, {freq['min_load']:.0f} MHz lowest under load"
        if freq
        else "CPU clock not reported"
    )
    for gpu, clocks in (p.get("gpu_clock_mhz") or {}).items():
        out.append(f"GPU {gpu} SM clock {clocks['idle']:.0f} MHz idle, {clocks['min_load']:.0f} MHz lowest under load")
    return out


def _csv(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def csv_files(jobs: list[dict[str, Any]], packings: list[dict[str, Any]]) -> dict[str, str]:
    """Extra CSV files by name suffix: `concurrency` (a row per level), `packing` (a row per worker and step)."""
    out = {}
    if rows := levels(jobs):
        out["concurrency"] = _csv(LEVEL_COLUMNS, rows)
    if rows := packing_rows(packings):
        out["packing"] = _csv(PACKING_COLUMNS, rows)
    return out


# -- SVG charts ---------------------------------------------------------------------------------------------

W, H = 720, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 260, 36, 44  # room for the axes' labels and, on the right, the legend


def _ticks(high: float) -> list[float]:
    """About five round steps from 0 to at least `high`."""
    if high <= 0:
        return [0.0, 1.0]
    step = 10 ** math.floor(math.log10(high / 5))
    for mult in (1, 2, 5, 10):
        if high / (step * mult) <= 5:
            step *= mult
            break
    return [step * i for i in range(math.ceil(high / step) + 1)]


def _label(v: float) -> str:
    return str(int(v)) if v == int(v) else f"{v:.3f}".rstrip("0")


def _frame(title: str, xlabel: str, ylabel: str, body: list[str], legend: list[tuple[str, str]]) -> str:
    e = html.escape
    parts = [
        f'<svg class="chart" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{e(title)}">',
        f'<rect width="{W}" height="{H}" fill="#ffffff"/>',
        f'<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{e(title)}</text>',
        *body,
        f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 8}" font-size="12" text-anchor="middle">{e(xlabel)}</text>',
        f'<text x="14" y="{(TOP + H - BOTTOM) / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {(TOP + H - BOTTOM) / 2})">{e(ylabel)}</text>',
    ]
    for i, (label, colour) in enumerate(legend):
        y = TOP + 8 + 18 * i
        parts.append(
            f'<rect x="{W - RIGHT + 12}" y="{y - 9}" width="14" height="10" fill="{colour}"/>'
            f'<text x="{W - RIGHT + 32}" y="{y}" font-size="11">{e(label[:40])}</text>'
        )
    return "".join(parts) + "</svg>"


def _axes(xs: list[float], xlabels: list[str], ymax: float, to_x: Any, to_y: Any) -> list[str]:
    parts = []
    for t in _ticks(ymax):
        y = to_y(t)
        parts.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#dddddd"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{_label(t)}</text>'
        )
    for x, label in zip(xs, xlabels, strict=True):
        parts.append(
            f'<text x="{to_x(x):.1f}" y="{H - BOTTOM + 16}" font-size="11" text-anchor="middle">'
            f"{html.escape(label)}</text>"
        )
    parts.append(
        f'<polyline points="{LEFT},{TOP} {LEFT},{H - BOTTOM} {W - RIGHT},{H - BOTTOM}" fill="none" stroke="#333333"/>'
    )
    return parts


def line_chart(
    title: str, xlabel: str, ylabel: str, series: list[tuple[str, list[tuple[float, float]]]], log_x: bool = False
) -> str:
    """Lines with their points marked, one per series (label, [(x, y)]), y from 0; x on a log2 scale if asked."""
    xs = sorted({x for _, pts in series for x, _ in pts})
    ymax = max([y for _, pts in series for _, y in pts] or [1.0]) or 1.0
    top = _ticks(ymax)[-1]
    fx = (lambda v: math.log2(v)) if log_x else (lambda v: v)
    lo, hi = fx(xs[0]), fx(xs[-1])
    span = (hi - lo) or 1.0

    def to_x(v: float) -> float:
        inner = W - RIGHT - LEFT - 40
        return LEFT + 20 + (inner * (fx(v) - lo) / span if hi > lo else inner / 2)

    def to_y(v: float) -> float:
        return H - BOTTOM - (H - BOTTOM - TOP - 10) * v / top

    body = _axes(xs, [_label(x) for x in xs], top, to_x, to_y)
    legend = []
    for i, (label, pts) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        legend.append((label, colour))
        coords = " ".join(f"{to_x(x):.1f},{to_y(y):.1f}" for x, y in sorted(pts))
        body.append(f'<polyline class="series" points="{coords}" fill="none" stroke="{colour}" stroke-width="3"/>')
        body += [f'<circle cx="{to_x(x):.1f}" cy="{to_y(y):.1f}" r="4" fill="{colour}"/>' for x, y in pts]
    return _frame(title, xlabel, ylabel, body, legend)


def bar_chart(title: str, ylabel: str, groups: list[tuple[str, list[float]]], names: list[str], scale: float) -> str:
    """Grouped bars: per group (label, values), one bar per name; values divided by `scale` for the axis."""
    ymax = max([v / scale for _, vals in groups for v in vals] or [1.0]) or 1.0
    top = _ticks(ymax)[-1]
    inner = W - RIGHT - LEFT - 20
    slot = inner / max(len(groups), 1)
    bar = min(28.0, slot * 0.8 / max(len(names), 1))

    def to_y(v: float) -> float:
        return H - BOTTOM - (H - BOTTOM - TOP - 10) * v / top

    centres = [float(i) for i in range(len(groups))]
    body = _axes(centres, [str(i + 1) for i in range(len(groups))], top, lambda i: LEFT + 10 + slot * (i + 0.5), to_y)
    for i, (label, vals) in enumerate(groups):
        x0 = LEFT + 10 + slot * (i + 0.5) - bar * len(vals) / 2
        for k, v in enumerate(vals):
            y = to_y(v / scale)
            body.append(
                f'<rect class="series" x="{x0 + k * bar:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" '
                f'height="{H - BOTTOM - y:.1f}" fill="{PALETTE[k % len(PALETTE)]}"><title>{html.escape(label)}: '
                f"{html.escape(names[k])} {_size(v)}</title></rect>"
            )
    legend = [(n, PALETTE[k % len(PALETTE)]) for k, n in enumerate(names)]
    legend += [(f"{i + 1}: {label}", "#ffffff") for i, (label, _) in enumerate(groups[:8])]
    return _frame(title, "cell (numbered in the legend)", ylabel, body, legend)


def html_charts(jobs: list[dict[str, Any]], packings: list[dict[str, Any]]) -> str:
    """The charts section of the HTML page ('' when the run has nothing to chart)."""
    charts = []
    swept = [j for j in jobs if j["measurements"].get("concurrency")]
    if swept:
        for key, what in (("aggregate_tps", "aggregate"), ("per_stream_tps", "per-stream")):
            series = [
                (
                    f"{j['model']} {j['backend']}@{j['pool']}",
                    [(float(e["level"]), float(e[key])) for e in j["measurements"]["concurrency"]],
                )
                for j in swept
            ]
            charts.append(line_chart(f"{what} tokens/s against concurrency", "concurrency", "tokens/s", series, True))
    if points := memory_points(jobs):
        groups = [(label, [float(p), float(m)]) for label, p, m in points]
        charts.append(bar_chart("predicted vs measured memory", "GB", groups, ["predicted", "measured"], 1e9))
    for p in packings:
        series = []
        for model in dict.fromkeys(p["models"]):
            pts = []
            alone = next((w["alone_tps"] for w in p["workers"] if w["model"] == model and w["alone_tps"]), None)
            for step in steps(p):
                # Alone against the mean speed of this model's workers at this count (a mean of ratios would
                # let one starved worker swamp the rest).
                speeds = [w["together_tps"] for w in step["workers"] if w["model"] == model and w["together_tps"]]
                if alone and speeds:
                    pts.append((float(step["count"]), alone / (sum(speeds) / len(speeds))))
            if pts:
                series.append((model, pts))
        if series:
            charts.append(
                line_chart(
                    f"slowdown against co-resident models on {p['pool']}",
                    "workers running at once",
                    "alone / together tokens/s",
                    series,
                )
            )
    if not charts:
        return ""
    return "<h2>Capacity</h2>" + "".join(f"<figure>{c}</figure>" for c in charts)


def html_tables(jobs: list[dict[str, Any]], packings: list[dict[str, Any]]) -> str:
    """The sweep levels and packing rows as HTML tables ('' when there are none)."""
    out = []
    for title, columns, rows in (
        ("Concurrency", LEVEL_COLUMNS, levels(jobs)),
        ("Packing", PACKING_COLUMNS, packing_rows(packings)),
    ):
        if not rows:
            continue
        head = "".join(f"<th>{c}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape('' if r[c] is None else str(r[c]))}</td>" for c in columns) + "</tr>"
            for r in rows
        )
        out.append(f"<h2>{title}</h2><table><tr>{head}</tr>{body}</table>")
    for p in packings:
        out.append(f"<p>{html.escape(p['pool'])}: " + html.escape("; ".join(node_lines(p))) + "</p>")
    return "".join(out)
