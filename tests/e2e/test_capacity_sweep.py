"""The concurrency sweep on real workers of both engines (the embedded one serialises, llama-server --parallel 4
batches), on the local pool and an sshd pool: every stream answers, each level is stored as it is measured,
and the levels reach every export."""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from rbee_tui.config import Config, PoolConfig, concurrency_levels, engine_names, parse
from rbee_tui.errors import RbeeError
from rbee_tui.matrix.plan import Cell
from rbee_tui.matrix.scheduler import MatrixRunner
from rbee_tui.matrix.store import Store
from rbee_tui.matrix.sweep import engine_label, percentile, split_backend, with_engines
from rbee_tui.pools.client import PoolClient
from tests.support.hub import HubServer
from tests.support.site import Site
from tests.support.sshd import sshd_available


def _llama_server() -> str | None:
    env = os.environ.get("RBEE_LLAMA_SERVER")
    if env:
        return env
    found = sorted(glob.glob(str(Path.home() / ".cache/rbee/llama.cpp/*/bin/llama-server")))
    return found[-1] if found else None


LLAMA_SERVER = _llama_server()
needs_llama_server = pytest.mark.skipif(
    LLAMA_SERVER is None, reason="llama-server is not built: run scripts/build-llama-cpp.sh (CI does)"
)
LEVELS = (1, 2, 4)
ENGINES = ("llama-cpp-python", "llama-server")


# -- the pieces ---------------------------------------------------------------------------------------------


def test_levels_and_engines_from_the_config_and_the_command_line() -> None:
    cfg = parse({"matrix": {"concurrency": [4, 1, 2, 2], "engines": ["llama-server", "llama-cpp-python"]}})
    assert cfg.matrix.concurrency == (1, 2, 4)  # ascending, each once
    assert cfg.matrix.engines == ("llama-server", "llama-cpp-python")
    assert parse(cfg.to_toml()).matrix == cfg.matrix  # written back as read
    assert concurrency_levels("1, 2,8") == (1, 2, 8)
    for bad in ("0", "1,x", "", [1.5], 300):
        with pytest.raises(RbeeError, match="concurrency"):
            concurrency_levels(bad)
    with pytest.raises(RbeeError, match="unknown engine"):
        engine_names("llama-cpp-python,vllm")
    with pytest.raises(RbeeError, match=r"matrix.concurrency: each level is a whole number from 1 to 256"):
        parse({"matrix": {"concurrency": [0]}})


def test_a_column_names_its_engine() -> None:
    assert engine_label("cpu", "llama-cpp-python") == "cpu"
    assert engine_label("cpu", "llama-server") == "cpu/llama-server"
    assert split_backend("cpu/llama-server") == ("cpu", "llama-server")
    assert split_backend("cuda") == ("cuda", "llama-cpp-python")
    cells = [Cell("m", "local", "cpu"), Cell("m", "a+b", "rpc")]
    both = with_engines(cells, ENGINES)
    assert [c.key for c in both] == ["m@cpu@local", "m@cpu/llama-server@local", "m@rpc@a+b"]
    assert with_engines(cells, ()) == cells
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5 and percentile([5.0], 95) == 5.0


# -- on real workers ----------------------------------------------------------------------------------------


def _check_levels(job: dict[str, Any]) -> None:
    engine = split_backend(job["backend"])[1]
    levels = job["measurements"]["concurrency"]
    assert [e["level"] for e in levels] == list(LEVELS), job
    for e in levels:
        assert e["streams_ok"] == e["level"], e  # every stream of the level answered with tokens
        assert e["tokens"] >= e["level"] and e["aggregate_tps"] > 0 and e["per_stream_tps"] > 0, e
        assert 0 < e["ttft_p50_ms"] <= e["ttft_p95_ms"], e
        assert e["engine"] == engine and e["parallel"] == (4 if engine == "llama-server" else 1), e


@needs_llama_server
async def test_each_level_is_stored_as_it_is_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_LLAMA_SERVER", str(LLAMA_SERVER))
    client = PoolClient(PoolConfig(name="local", models_dir=str(tmp_path / "models")))
    client.start()
    seen: list[tuple[int, int]] = []  # (job id, levels measured) as the runner reported them

    def changed(job: dict[str, Any]) -> None:
        if job.get("concurrency") and job["state"] == "running":
            seen.append((job["job_id"], len(job["concurrency"])))

    try:
        await client.wait_connected(60)
        runner = MatrixRunner({"local": client}, tmp_path / "r.db", max_tokens=8, on_change=changed, concurrency=LEVELS)
        cells = with_engines([Cell("tiny-test", "local", "cpu")], ENGINES)
        run_id = await runner.run(cells)
    finally:
        await client.close()
    store = Store(tmp_path / "r.db")
    try:
        jobs = store.jobs(run_id)
        assert [j["state"] for j in jobs] == ["passed", "passed"], [(j["state"], j["reason"]) for j in jobs]
        for job in jobs:
            _check_levels(job)
            # The curve grew level by level, each a write of its own before the cell passed.
            assert [n for jid, n in seen if jid == job["id"]] == [1, 2, 3]
            timeline = [e["detail"] or e["state"] for e in store.events(job["id"])]
            marks = [f"concurrency {n} measured" for n in LEVELS]
            assert [t for t in timeline if t in marks] == marks and timeline[-1] == "passed", timeline
    finally:
        store.close()
    assert not [w for w in await _workers(tmp_path / "models") if w["state"] != "exited"]


async def _workers(models_dir: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "rbee_tui.hive.cli", "worker", "list", "--json", "--models-dir", str(models_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(proc.stdout.splitlines()[-1])["workers"]


@needs_llama_server
@pytest.mark.skipif(sshd_available() is not None, reason=str(sshd_available()))
def test_sweep_on_both_engines_local_and_over_ssh(tmp_path: Path) -> None:
    hub = HubServer().start()
    site = Site(tmp_path, hub)
    try:
        local = PoolConfig(name="local", models_dir=str(tmp_path / "local-models"), llama_server=LLAMA_SERVER)
        remote = replace(site.pools["pool-a"], llama_server=LLAMA_SERVER)
        cfg, out, db = tmp_path / "config.toml", tmp_path / "out", tmp_path / "results.db"
        cfg.write_text(tomli_w.dumps(Config(pools=(local, remote)).to_toml()))
        cmd = [sys.executable, "-m", "rbee_tui.cli", "--config", str(cfg), "matrix", "run", "--models", "tiny-test"]
        cmd += ["--concurrency", "1,2,4", "--engines", ",".join(ENGINES), "--max-tokens", "8"]
        cmd += ["--export", "md,csv,json,html", "--out", str(out), "--db", str(db)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    finally:
        site.stop()
        hub.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Passed: 4  Failed: 0" in proc.stdout, proc.stdout
    assert proc.stdout.count("sweep x1 ") == 4, proc.stdout
    store = Store(db)
    try:
        run = store.runs()[0]
        jobs = {(j["pool"], j["backend"]): j for j in store.jobs(run["id"])}
        assert json.loads(run["settings"])["concurrency"] == [1, 2, 4]
    finally:
        store.close()
    assert set(jobs) == {(p, b) for p in ("local", "pool-a") for b in ("cpu", "cpu/llama-server")}
    for job in jobs.values():
        _check_levels(job)
    # Every export carries every level of every cell.
    md = (out / "MODEL_SUPPORT.md").read_text()
    section = md[md.index("## Concurrency") :]
    for pool, backend in jobs:
        for level in LEVELS:
            assert f"| tiny-test | {pool} | {backend} |" in section and f"| {level}/{level} |" in section
    with open(out / f"matrix-run-{run['id']}-concurrency.csv") as fh:
        flat = list(csv.DictReader(fh))
    assert len(flat) == 12 and {(r["pool"], r["backend"], r["level"]) for r in flat} == {
        (p, b, str(n)) for p, b in jobs for n in LEVELS
    }
    with open(out / f"matrix-run-{run['id']}.csv") as fh:
        assert all(len(json.loads(r["concurrency"])) == 3 for r in csv.DictReader(fh))
    results = json.loads((out / f"matrix-run-{run['id']}.json").read_text())["results"]
    assert all([e["level"] for e in r["concurrency"]] == list(LEVELS) for r in results)
    page = (out / f"matrix-run-{run['id']}.html").read_text()
    assert page.count('<svg class="chart"') >= 2 and page.count('class="series"') >= 8  # 4 cells, 2 charts
