"""One quick run of every benchmark at its smallest size, so `python -m bench` never rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())["results"]
    names = {r["name"] for r in results}
    for expected in ("worker TTFT overhead", "readiness: loaded -> known ready", "metrics: CPU per sample"):
        assert expected in names
    assert all(r["figure"] > 0 or r["unit"] == "ms" for r in results)
    assert "benchmark" in proc.stdout and "target" in proc.stdout
