"""One quick run of every benchmark at its smallest size, so `python -m bench` never rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rbee_tui.hive.setup import build_cache
from tests.conftest import REPO_ROOT
from tests.support.sshd import sshd_available


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
    expected = {
        "worker TTFT overhead",
        "readiness: loaded -> known ready",
        "metrics: CPU per sample",
        "metrics: agent process at 1 Hz",
        "dashboard 4x2: keypress p95",
        "dashboard: start to first paint",
        "gateway: TTFT added",
        "gateway: decode tok/s",
        "sweep: llama-server aggregate x4 vs x1",
        "sweep: llama-cpp-python aggregate x4 vs x1",
    }
    if sshd_available() is None:  # the two that need an SSH pool
        expected |= {"matrix 1x2: wall vs critical path", "remote catalog: persistent conn"}
        if list(build_cache().glob("*/bin/ggml-rpc-server")):  # and llama.cpp's tools, for the clusters
            expected |= {f"cluster: {w} over {n} nodes" for w in ("decode", "prefill") for n in (2, 3)}
            expected |= {"cluster: SSH relay vs direct, decode", "cluster: load, warm vs cold cache"}
    assert expected <= names, expected - names
    # Rates and times are positive; a difference (TTFT overhead) or a CPU share or time in a short window may be 0
    # or less.
    assert all(r["figure"] > 0 or r["unit"] in ("ms", "%", "us") for r in results), [
        r for r in results if not (r["figure"] > 0 or r["unit"] in ("ms", "%", "us"))
    ]
    assert "benchmark" in proc.stdout and "target" in proc.stdout
