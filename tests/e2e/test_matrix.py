"""The matrix on real pools (local + two sshd), real workers and generated models; its store and exports."""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import tomli_w

from rbee_tui.config import Config, PoolConfig
from rbee_tui.matrix import export
from rbee_tui.matrix.headless import gather_plan
from rbee_tui.matrix.plan import Cell
from rbee_tui.matrix.scheduler import MatrixRunner
from rbee_tui.matrix.store import Store
from rbee_tui.pools.client import PoolClient
from rbee_tui.tinymodel import TinySpec, write_model
from tests.support.hub import HubServer
from tests.support.site import Site
from tests.support.sshd import sshd_available
from tests.support.waiting import until

pytestmark = pytest.mark.skipif(sshd_available() is not None, reason=str(sshd_available()))
REPO = "rbee-test/matrix-GGUF"
MODELS = {
    "gen-qwen2": TinySpec(name="gen qwen2", arch="qwen2", n_embd=96, n_head=4, n_head_kv=4, n_ff=192, seed=11),
    "gen-big": TinySpec(name="gen big llama", n_embd=256, n_layer=4, n_ff=512, seed=12),
    "broken": TinySpec(name="broken", arch="bogus-arch", seed=13),
}
GOOD = ["tiny-test", "gen-qwen2", "gen-big"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen")
    return {name: write_model(root / f"{name}.gguf", spec) for name, spec in MODELS.items()}


@pytest.fixture
def lab(tmp_path: Path, generated: dict[str, Path], hive) -> Iterator[tuple[Site, Config, HubServer]]:
    hub = HubServer().start()
    for name, path in generated.items():
        hub.add(REPO, f"{name}.gguf", path=path)
    site = Site(tmp_path, hub)
    local = PoolConfig(name="local", models_dir=str(tmp_path / "local-models"))
    pools = {"local": local, "pool-a": site.pools["pool-a"], "pool-b": site.pools["pool-b"]}
    # pool-a says it has CUDA: this machine has none, so those cells are skipped with the reason.
    from dataclasses import replace

    pools["pool-a"] = replace(pools["pool-a"], backends=("cpu", "cuda"))
    import os

    os.environ["HF_ENDPOINT"] = hub.url  # for the local pool; ssh pools get it from their sshd
    for pool in pools.values():
        for name in MODELS:
            hive(
                "models",
                "register",
                name,
                "--repo",
                REPO,
                "--file",
                f"{name}.gguf",
                "--pool-id",
                pool.name,
                "--models-dir",
                pool.models_dir,
                check=True,
            )
    yield site, Config(pools=tuple(pools.values())), hub
    del os.environ["HF_ENDPOINT"]
    site.stop()
    hub.stop()


def matrix_cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`rbee-tui --config CFG matrix run ARGS` as a script would call it."""
    cmd = [sys.executable, "-m", "rbee_tui.cli", "--config", str(cfg), "matrix", "run", *args]
    try:
        # Under the suite's own timeout, so that a stuck run shows how far it got.
        return subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"the matrix run did not finish in 200 s:\n{out}\n{err}")


def md_marks(text: str) -> dict[tuple[str, str], str]:
    """(model, column) -> mark, read back from the Markdown support table."""
    lines = text.splitlines()
    start = lines.index("## Tested Models") + 2
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    out = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for col, mark in zip(header[3:-1], cells[3:-1], strict=True):
            out[(cells[0], col)] = mark
    return out


def test_full_matrix_headless(lab, tmp_path: Path) -> None:
    _, config, _ = lab
    cfg = tmp_path / "config.toml"
    cfg.write_text(tomli_w.dumps(config.to_toml()))
    out, db = tmp_path / "out", tmp_path / "results.db"
    proc = matrix_cli(
        cfg,
        "--models",
        ",".join([*GOOD, "broken"]),
        "--export",
        "md,csv,json,html",
        "--out",
        str(out),
        "--db",
        str(db),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the broken model fails, so the run fails
    assert "Passed: 9  Failed: 3  Skipped: 4" in proc.stdout
    store = Store(db)
    run_id = store.runs()[0]["id"]
    jobs = store.jobs(run_id)
    by = {(j["model"], j["backend"], j["pool"]): j for j in jobs}
    for pool in ("local", "pool-a", "pool-b"):
        for model in GOOD:
            j = by[(model, "cpu", pool)]
            assert j["state"] == "passed", j
            m = j["measurements"]
            for key in (
                "download_s",
                "load_s",
                "ttft_ms",
                "pp_avg_ts",
                "avg_ts",
                "n_prompt",
                "n_gen",
                "peak_rss",
                "model_size",
                "build_commit",
                "n_gpu_layers",
            ):
                assert m.get(key) is not None, (model, pool, key)
            assert m["n_gen"] == 16 and m["avg_ts"] > 0 and m["peak_rss"] > 10_000_000
            assert m["download_s"] > 0 if model != "tiny-test" else m["download_s"] >= 0
        broken = by[("broken", "cpu", pool)]
        assert broken["state"] == "failed"
        assert "bogus-arch" in broken["reason"] or "could not load" in broken["reason"]
        assert broken["log_tail"], "a failure carries the worker's last log lines"
    for model in [*GOOD, "broken"]:
        skipped = by[(model, "cuda", "pool-a")]
        assert skipped["state"] == "skipped" and "backend cuda not on pool-a" in skipped["reason"]
    timeline = [e["state"] for e in store.events(by[("gen-big", "cpu", "pool-b")]["id"])]
    assert timeline == ["queued", "downloading", "spawning", "loading", "running", "verifying", "passed"]

    # The Markdown export says what the store says, cell by cell.
    marks = md_marks((out / "MODEL_SUPPORT.md").read_text())
    for j in jobs:
        assert marks[(j["model"], f"{j['backend']}@{j['pool']}")] == export.MARK[j["state"]]
    rows = list(csv.DictReader((out / f"matrix-run-{run_id}.csv").open()))
    assert len(rows) == len(jobs) and {"model_size", "n_gpu_layers", "avg_ts", "build_commit"} <= set(rows[0])
    assert json.loads((out / f"matrix-run-{run_id}.json").read_text())["run"]["id"] == run_id
    page = (out / f"matrix-run-{run_id}.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page.split("<body>")[1]
    # Every worker was stopped.
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if "rbee_tui.worker.launch" in " ".join(p.info["cmdline"] or [])
        and str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ]
    store.close()


def test_headless_exit_zero_when_all_pass(tmp_path: Path, models_dir: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(tomli_w.dumps({"pools": [{"name": "local", "models_dir": str(models_dir)}]}))
    proc = matrix_cli(
        cfg,
        "--out",
        str(tmp_path),
        "--db",
        str(tmp_path / "r.db"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed     tiny-test@cpu@local" in proc.stdout and (tmp_path / "MODEL_SUPPORT.md").exists()


async def _runner(config: Config, db: Path, models: list[str]) -> tuple[dict[str, PoolClient], MatrixRunner, list]:
    clients = {
        p.name: PoolClient(p, sample_interval=0.5, keepalive_interval=2, keepalive_count_max=3, max_backoff=1)
        for p in config.pools
        if p.name != "local"
    }
    for c in clients.values():
        c.start()
    _, cells = await gather_plan(clients, models)
    events: list[dict] = []
    runner = MatrixRunner(clients, Store(db), on_change=events.append)
    return clients, runner, [c for c in cells if c.backend == "cpu"] + [], events  # type: ignore[return-value]


async def test_a_lost_pool_marks_its_cells_pool_lost(lab, tmp_path: Path) -> None:
    site, config, _ = lab
    clients, runner, cells, events = await _runner(config, tmp_path / "r.db", GOOD)
    try:
        killed = False

        def kill_after_first(job: dict) -> None:
            nonlocal killed
            if job["state"] == "passed" and not killed:
                row = runner.store.db.execute("SELECT pool FROM jobs WHERE id = ?", (job["job_id"],)).fetchone()
                if row["pool"] == "pool-b":
                    killed = True
                    site.sshd["pool-b"].kill()

        runner.on_change = lambda job: (events.append(job), kill_after_first(job))
        run_id = await asyncio.wait_for(runner.run(cells), 300)
        jobs = {(j["model"], j["pool"]): j for j in runner.store.jobs(run_id)}
        b = [jobs[(m, "pool-b")]["state"] for m in GOOD]
        assert b[0] == "passed" and b.count("pool lost") >= 1 and "failed" not in b
        a = [(jobs[(m, "pool-a")]["state"], jobs[(m, "pool-a")]["reason"]) for m in GOOD]
        assert all(state == "passed" for state, _ in a), f"the other pool was disturbed: {a}"
    finally:
        await asyncio.gather(*(c.close() for c in clients.values()))


async def test_cancel_stops_every_worker(lab, tmp_path: Path) -> None:
    _, config, _ = lab
    clients, runner, cells, events = await _runner(config, tmp_path / "r.db", GOOD)
    try:
        task = asyncio.create_task(runner.run(cells))
        await until(lambda: any(e["state"] == "running" for e in events), 120, "a running job")
        runner.cancel()
        run_id = await asyncio.wait_for(task, 60)
        states = [j["state"] for j in runner.store.jobs(run_id)]
        assert "cancelled" in states and not {"queued", "running", "spawning", "loading"} & set(states)
        assert runner.store.run(run_id)["state"] == "cancelled"
        for c in clients.values():
            assert [w for w in await c.workers() if w["state"] != "exited"] == []
    finally:
        await asyncio.gather(*(c.close() for c in clients.values()))


def test_a_crash_keeps_finished_cells(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    store = Store(db)
    run_id = store.new_run({"models": ["a", "b"]})
    done = store.add_job(run_id, Cell("a", "local", "cpu"))
    store.set_state(done, "passed", avg_ts=42.0)
    going = store.add_job(run_id, Cell("b", "local", "cpu"))
    store.set_state(going, "running")
    store.db.close()  # the process dies here: no finish_run
    again = Store(db)
    assert again.run(run_id)["state"] == "interrupted"
    jobs = {j["model"]: j for j in again.jobs(run_id)}
    assert jobs["a"]["state"] == "passed" and jobs["a"]["measurements"]["avg_ts"] == 42.0
    assert jobs["b"]["state"] == "interrupted"
    next_run = again.new_run({})
    again.set_state(again.add_job(next_run, Cell("a", "local", "cpu")), "passed", avg_ts=50.0)
    assert again.previous(next_run, "a@cpu@local")["avg_ts"] == 42.0
