"""Result tables of a run: Markdown (MODEL_SUPPORT.md's shape), CSV, JSON and one self-contained HTML page.

Columns that mean what a llama-bench field means carry its name (model_size, model_type, n_gpu_layers,
n_prompt, n_gen, avg_ts, build_commit), so the tables line up with llama-bench's.
"""

from __future__ import annotations

import csv
import html
import io
import json
import time
from pathlib import Path
from typing import Any

from rbee_tui import files
from rbee_tui.catalog import human_size
from rbee_tui.matrix import capacity_export

MARK = {"passed": "✅", "failed": "❌", "skipped": "⏭", "pool lost": "⚠", "cancelled": "⚠", "interrupted": "⚠"}
COLUMNS = (
    "model",
    "model_type",
    "model_size",
    "pool",
    "backend",
    "gpu",
    "n_gpu_layers",
    "status",
    "reason",
    "download_s",
    "load_s",
    "ttft_ms",
    "n_prompt",
    "n_gen",
    "pp_avg_ts",
    "avg_ts",
    "peak_rss",
    "peak_vram",
    "peak_temp_c",
    # The memory model against the worker (rbee_tui/capacity.py): predicted, RSS once loaded, the node's RAM in
    # use (its growth over the cell), what the worker held beyond its weights, and swap traffic during the cell.
    "predicted_bytes",
    "rss_loaded",
    "ram_used_delta",
    "overhead_bytes",
    "swap_in_out_bytes",
    "swapped",
    "build_commit",
    "net_load_bytes",
    "net_prefill_bytes",
    "net_decode_bytes",
    "needed_bytes",
    "free_bytes",
    "nodes",
    "concurrency",  # the sweep's levels (matrix/sweep.py); CSV holds it as JSON, as it does a cluster's nodes
    "test_time",
)
NODE_COLUMNS = (
    "pool",
    "layers",
    "share",
    "planned_bytes",
    "peak_ram_used",
    "link",
    "net_load_bytes",
    "net_prefill_bytes",
    "net_decode_bytes",
)
FORMATS = ("md", "csv", "json", "html")
METHOD = (
    "download the model if needed, spawn a worker, wait for /health ready, run the prompt "
    '"Hello, how are you?" twice with the same seed, pass if tokens were generated with no error and both '
    "runs gave the same text, then stop the worker. A cluster cell (rpc@head+nodes) plans the model over its "
    "pools (spread), starts an rpc-server on each and the coordinator on the head, runs the same test through "
    "it and stops everything; its nodes' memory is the peak RAM used their pools' samples saw during the cell, "
    "and its network bytes are counted by this machine's relay of each SSH-relayed node's RPC link (both "
    "directions), during load, prefill (up to the first token) and decode"
)


def rows(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per job with the llama-bench-style column names."""
    out = []
    for j in jobs:
        m = j["measurements"]
        row = {
            "model": j["model"],
            "pool": j["pool"],
            "backend": j["backend"],
            "gpu": j["gpu"],
            "status": j["state"],
            "reason": j["reason"],
            "test_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(j["updated_at"])),
        }
        row.update({k: m.get(k) for k in COLUMNS if k not in row})
        out.append(row)
    return out


def _size(n: Any) -> str:
    if n is None:
        return "n/a"
    return human_size(int(n)) if n else "0 B"


def _swap(row: dict[str, Any]) -> str:
    """A cell's swap traffic: flagged when the node swapped while it ran, n/a where the node cannot tell."""
    if row["swap_in_out_bytes"] is None:
        return "n/a"
    return f"⚠ {_size(row['swap_in_out_bytes'])}" if row["swapped"] else "none"


def _layers(node: dict[str, Any]) -> str:
    first, last = node["layers"]
    return f"{first}-{last}"


def _columns(jobs: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(f"{j['backend']}@{j['pool']}" for j in jobs))


def markdown(run: dict[str, Any], jobs: list[dict[str, Any]]) -> str:
    """The support matrix as MODEL_SUPPORT.md lays it out, with performance and memory tables."""
    cols = _columns(jobs)
    models = list(dict.fromkeys(j["model"] for j in jobs))
    by = {(j["model"], f"{j['backend']}@{j['pool']}"): j for j in jobs}
    date = time.strftime("%Y-%m-%d", time.gmtime(run.get("started_at", time.time())))
    passed = sum(j["state"] == "passed" for j in jobs)
    tested = sum(j["state"] in ("passed", "failed") for j in jobs)
    lines = [
        "# Model Support Matrix",
        "",
        f"**Date:** {date}  ",
        f"**Run:** {run.get('id')} ({run.get('state')})  ",
        "**Tool:** rbee-tui matrix",
        "",
        "---",
        "",
        "## Tested Models",
        "",
        "| Model | Architecture | Size | " + " | ".join(cols) + " | Notes |",
        "|" + "---|" * (len(cols) + 4),
    ]
    for model in models:
        any_job = next(j for j in jobs if j["model"] == model)
        size = any_job["measurements"].get("model_size")
        notes = "; ".join(
            f"{c}: {by[(model, c)]['reason']}"
            for c in cols
            if (model, c) in by and by[(model, c)]["state"] in ("failed",)
        )
        cells = [MARK.get(by[(model, c)]["state"], "…") if (model, c) in by else "" for c in cols]
        lines.append(
            f"| {model} | {any_job['measurements'].get('model_type', '')} | "
            f"{human_size(size) if size else ''} | " + " | ".join(cells) + f" | {notes} |"
        )
    lines += [
        "",
        f"**Total Tests:** {tested} ({len(jobs) - tested} not run)  ",
        f"**Pass Rate:** {100.0 * passed / tested if tested else 0:.0f}%  ",
        f"**Test Date:** {date}",
        "",
        "✅ passed · ❌ failed · ⏭ skipped (cannot run there) · ⚠ pool lost, cancelled or interrupted",
        "",
        "---",
        "",
        "## Performance",
        "",
        "| model | model_size | pool | backend | n_gpu_layers | n_prompt | n_gen | load_s | ttft_ms | pp_avg_ts "
        "| avg_ts | build_commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(jobs):
        if r["status"] == "passed":
            lines.append(
                f"| {r['model']} | {human_size(r['model_size'] or 0)} | {r['pool']} | {r['backend']} | "
                f"{r['n_gpu_layers']} | {r['n_prompt']} | {r['n_gen']} | {r['load_s']:.2f} | "
                f"{r['ttft_ms']:.1f} | {r['pp_avg_ts']:.1f} | {r['avg_ts']:.1f} | {r['build_commit']} |"
            )
    lines += [
        "",
        "## Memory",
        "",
        "| model | pool | backend | peak_rss | peak_vram | peak_temp_c | predicted | rss_loaded | overhead "
        "| ram_used_delta | swap |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(jobs):
        if r["status"] == "passed":
            temp = f"{r['peak_temp_c']:.0f}" if r["peak_temp_c"] is not None else "n/a"
            lines.append(
                f"| {r['model']} | {r['pool']} | {r['backend']} | {human_size(r['peak_rss'] or 0)} | "
                f"{human_size(r['peak_vram']) if r['peak_vram'] else 'n/a'} | {temp} | {_size(r['predicted_bytes'])} | "
                f"{_size(r['rss_loaded'])} | {_size(r['overhead_bytes'])} | {_size(r['ram_used_delta'])} | {_swap(r)} |"
            )
    clusters = [r for r in rows(jobs) if r["backend"] == "rpc" and (r["status"] == "passed" or r["needed_bytes"])]
    if clusters:
        lines += [
            "",
            "## Clusters",
            "",
            "| model | cluster | status | node | layers | share | planned | peak RAM used | link | net load "
            "| net prefill | net decode |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in clusters:
            if r["status"] != "passed":
                lines.append(
                    f"| {r['model']} | {r['pool']} | {r['status']} | needs {_size(r['needed_bytes'])}, "
                    f"{_size(r['free_bytes'])} free | | | | | | | | |"
                )
                continue
            for n in r["nodes"] or []:
                lines.append(
                    f"| {r['model']} | {r['pool']} | {r['status']} | {n['pool']} | {_layers(n)} | "
                    f"{100 * n['share']:.0f}% | {_size(n['planned_bytes'])} | {_size(n['peak_ram_used'])} | "
                    f"{n['link']} | {_size(n['net_load_bytes'])} | {_size(n['net_prefill_bytes'])} | "
                    f"{_size(n['net_decode_bytes'])} |"
                )
    lines += capacity_export.markdown(jobs, run.get("packings") or [])
    failures = [r for r in rows(jobs) if r["status"] not in ("passed",) and r["reason"]]
    if failures:
        lines += ["", "## Not passed", ""]
        lines += [
            f"- {MARK.get(r['status'], '')} {r['model']} on {r['backend']}@{r['pool']}: {r['reason']}" for r in failures
        ]
    lines += ["", "## Test Methodology", "", f"Each cell: {METHOD}.", ""]
    return "\n".join(lines)


def to_csv(jobs: list[dict[str, Any]]) -> str:
    """One row per job, llama-bench-style columns."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    # A cluster's nodes go in one cell, as JSON: one row per job whatever the cluster's size.
    writer.writerows(
        {**r, **{k: json.dumps(r[k]) if r[k] else "" for k in ("nodes", "concurrency")}} for r in rows(jobs)
    )
    return buf.getvalue()


def to_json(run: dict[str, Any], jobs: list[dict[str, Any]]) -> str:
    """The run and its rows."""
    return json.dumps({"run": run, "results": rows(jobs)}, indent=2) + "\n"


def to_html(run: dict[str, Any], jobs: list[dict[str, Any]]) -> str:
    """A self-contained page: the matrix with coloured cells, then every row."""
    cols = _columns(jobs)
    by = {(j["model"], f"{j['backend']}@{j['pool']}"): j for j in jobs}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for model in dict.fromkeys(j["model"] for j in jobs):
        cells = []
        for c in cols:
            j = by.get((model, c))
            if j is None:
                cells.append("<td></td>")
                continue
            tps = j["measurements"].get("avg_ts")
            text = f"{MARK.get(j['state'], '')} {tps:.1f} tok/s" if tps else f"{MARK.get(j['state'], '')} {j['state']}"
            cells.append(
                f'<td class="{j["state"].replace(" ", "-")}" title="{html.escape(j["reason"])}">'
                f"{html.escape(text)}</td>"
            )
        body.append(f"<tr><th>{html.escape(model)}</th>{''.join(cells)}</tr>")
    packings = run.get("packings") or []
    flat = [c for c in COLUMNS if c not in ("nodes", "concurrency")]
    detail_head = "".join(f"<th>{c}</th>" for c in flat)
    detail = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if r[c] is None else str(r[c]))}</td>" for c in flat) + "</tr>"
        for r in rows(jobs)
    )
    node_rows = [
        "<tr>"
        + f"<td>{html.escape(r['model'])}</td><td>{html.escape(r['pool'])}</td>"
        + "".join(f"<td>{html.escape('' if n.get(c) is None else str(n[c]))}</td>" for c in NODE_COLUMNS)
        + "</tr>"
        for r in rows(jobs)
        if r["nodes"]
        for n in r["nodes"]
    ]
    if node_rows:
        node_head = "".join(f"<th>{c}</th>" for c in ("model", "cluster", *NODE_COLUMNS))
        detail_nodes = f"<h2>Clusters</h2><table><tr>{node_head}</tr>{''.join(node_rows)}</table>"
    else:
        detail_nodes = ""
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{border:1px solid #999;padding:4px 8px}.passed{background:#d4f4d4}.failed{background:#f8d0d0}"
        ".skipped{background:#eee}.pool-lost,.cancelled,.interrupted{background:#fbe9c0}"
    )
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Model Support Matrix</title>'
        f"<style>{style}</style></head><body><h1>Model Support Matrix</h1>"
        f"<p>Run {run.get('id')} ({html.escape(str(run.get('state')))}), "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(run.get('started_at', 0)))} UTC. {html.escape(METHOD)}.</p>"
        f"<table><tr><th>model</th>{head}</tr>{''.join(body)}</table>"
        f"<table><tr>{detail_head}</tr>{detail}</table>{detail_nodes}"
        f"{capacity_export.html_charts(jobs, packings)}{capacity_export.html_tables(jobs, packings)}</body></html>\n"
    )


def write(run: dict[str, Any], jobs: list[dict[str, Any]], formats: list[str], out: Path) -> list[Path]:
    """Write the chosen formats into `out` atomically; return the paths."""
    written = []
    for fmt in formats:
        text = {
            "md": lambda: markdown(run, jobs),
            "csv": lambda: to_csv(jobs),
            "json": lambda: to_json(run, jobs),
            "html": lambda: to_html(run, jobs),
        }[fmt]()
        path = Path(out) / ("MODEL_SUPPORT.md" if fmt == "md" else f"matrix-run-{run.get('id')}.{fmt}")
        files.atomic_write(path, text)
        written.append(path)
        if fmt == "csv":  # a row per sweep level and per packed worker, in files of their own
            for name, extra in capacity_export.csv_files(jobs, run.get("packings") or []).items():
                written.append(Path(out) / f"matrix-run-{run.get('id')}-{name}.csv")
                files.atomic_write(written[-1], extra)
    return written
