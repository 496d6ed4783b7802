"""The HTML export's capacity charts: one self-contained file whose inline SVG charts a real headless Chromium
draws (a screenshot, decoded here, shows the series colour where the charts are, and not without them)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest

from rbee_tui.matrix import capacity_export, export

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian's `chromium` package; scripts/install.sh --test)"
)
SERIES = tuple(int(capacity_export.PALETTE[0][i : i + 2], 16) for i in (1, 3, 5))  # the first series' colour


def _job(job_id: int, backend: str, engine: str, parallel: int, agg: list[float]) -> dict[str, Any]:
    levels = [
        {
            "level": n,
            "streams_ok": n,
            "aggregate_tps": a,
            "per_stream_tps": a / n,
            "ttft_p50_ms": 10.0 * n,
            "ttft_p95_ms": 12.0 * n,
            "engine": engine,
            "parallel": parallel,
        }
        for n, a in zip((1, 2, 4), agg, strict=True)
    ]
    return {
        "id": job_id,
        "model": "tiny-test",
        "pool": "local",
        "backend": backend,
        "gpu": 0,
        "state": "passed",
        "reason": "",
        "updated_at": 1_700_000_000.0,
        "measurements": {
            "model_size": 514_560,
            "load_s": 0.5,
            "ttft_ms": 3.0,
            "pp_avg_ts": 900.0,
            "avg_ts": agg[0],
            "n_prompt": 6,
            "n_gen": 16,
            "peak_rss": 120_000_000,
            "predicted_bytes": 110_000_000,
            "concurrency": levels,
        },
    }


RUN = {
    "id": 7,
    "state": "finished",
    "started_at": 1_700_000_000.0,
    "settings": {"concurrency": [1, 2, 4]},
    "packings": [
        {
            "pool": "local",
            "models": ["big", "tiny-test", "big"],
            "budget_bytes": 500_000_000,
            "predicted_count": 2,
            "started": 2,
            "refused": "needs 0.2 GB, 0.1 GB free on local",
            "workers": [
                {"model": "big", "worker": "worker-cpu-0", "alone_tps": 300.0, "together_tps": 180.0,
                 "rss_bytes": 200_000_000, "predicted_bytes": 190_000_000},
                {"model": "tiny-test", "worker": "worker-cpu-1", "alone_tps": 900.0, "together_tps": 500.0,
                 "rss_bytes": 110_000_000, "predicted_bytes": 100_000_000},
            ],
            "steps": [
                {"count": 1, "workers": [{"model": "big", "worker": "worker-cpu-0", "together_tps": 290.0}]},
                {"count": 2, "workers": [{"model": "big", "worker": "worker-cpu-0", "together_tps": 180.0},
                                         {"model": "tiny-test", "worker": "worker-cpu-1", "together_tps": 500.0}]},
            ],
            "ram_used_peak": 3_000_000_000,
            "swap_used_peak": 0,
            "swap_in_out_bytes": 0,
            "temps_peak_c": None,
            "cpu_freq_mhz": {"idle": 2600.0, "min_load": 2400.0},
            "gpu_clock_mhz": None,
        }
    ],
}  # fmt: skip
JOBS = [
    _job(1, "cpu", "llama-cpp-python", 1, [400.0, 405.0, 410.0]),
    _job(2, "cpu/llama-server", "llama-server", 4, [380.0, 640.0, 900.0]),
]


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB rows of an 8-bit RGB or RGBA PNG, decoded with zlib and the five PNG filters."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    height = depth = colour = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert depth == 8 and colour in (2, 6), f"unexpected PNG format: depth {depth}, colour type {colour}"
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line) if bpp == 3 else bytes(v for k, v in enumerate(line) if k % 4 != 3))
        prev = line
    return width, height, rows


def count_colour(rows: list[bytes], rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    """Pixels within `tolerance` of `rgb` on every channel."""
    n = 0
    for row in rows:
        for i in range(0, len(row), 3):
            if all(abs(row[i + k] - rgb[k]) <= tolerance for k in range(3)):
                n += 1
    return n


def screenshot(page: Path, png: Path) -> None:
    # No network at all while it renders: every host resolves to nothing, so a chart that needed one would fail.
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--user-data-dir={page.parent / 'chromium-profile'}",
            f"--screenshot={png}",
            "--window-size=1400,4000",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert png.exists(), "chromium wrote no screenshot"


def test_the_page_is_self_contained(tmp_path: Path) -> None:
    page = export.to_html(RUN, JOBS)
    assert page.count('<svg class="chart"') == 4  # aggregate, per-stream, memory, slowdown
    assert "<script" not in page and not re.search(r"(src|href)\s*=", page)  # nothing fetched at view time
    assert not re.search(r"url\(", page) and "http" not in page.split("<body>")[1]
    # The curves hold the numbers they were given: the batching cell's aggregate line rises, per level.
    assert "aggregate tokens/s against concurrency" in page and "slowdown against co-resident models" in page
    md = export.markdown(RUN, JOBS)
    assert "## Concurrency" in md and "| 2.37x |" in md  # 900 / 380 at level 4 against level 1
    assert "## Packing: local" in md and "refused: needs 0.2 GB" in md


@needs_chromium
def test_chromium_draws_the_charts(tmp_path: Path) -> None:
    with_charts, without = tmp_path / "with.html", tmp_path / "without.html"
    page = export.to_html(RUN, JOBS)
    with_charts.write_text(page)
    without.write_text(re.sub(r'<figure><svg class="chart".*?</svg></figure>', "", page, flags=re.S))
    counts = {}
    for html_file in (with_charts, without):
        png = html_file.with_suffix(".png")
        screenshot(html_file, png)
        width, height, rows = png_pixels(png)
        assert (width, height) == (1400, 4000)
        counts[html_file.stem] = count_colour(rows, SERIES)
    # The first series' lines, points and legend swatch: hundreds of pixels; nothing else on the page is that blue.
    assert counts["with"] > 500, counts
    assert counts["without"] < 20, counts
