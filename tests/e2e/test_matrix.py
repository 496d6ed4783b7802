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
from rbee_tui.matrix.plan import Cell
from rbee_tui.matrix.scheduler import MatrixRunner
from rbee_tui.matrix.store import Store
from rbee_tui.matrix.survey import gather_plan
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
    return tui_cli(cfg, "matrix", "run", *args)


def tui_cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`rbee-tui --config CFG ARGS` as a script would call it."""
    cmd = [sys.executable, "-m", "rbee_tui.cli", "--config", str(cfg), *args]
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


CRASHING_WRITER = """
import os, sys
from rbee_tui.matrix.plan import Cell
from rbee_tui.matrix.store import Store
store = Store(sys.argv[1])
run_id = store.new_run({"models": ["a", "b"]})
store.set_state(store.add_job(run_id, Cell("a", "local", "cpu")), "passed", avg_ts=42.0)
store.set_state(store.add_job(run_id, Cell("b", "local", "cpu")), "running")
print(run_id, flush=True)
if sys.argv[2] == "die":
    os._exit(9)  # the process dies here: no finish_run
sys.stdin.read()  # a live run: waits until the test lets it go
"""


def test_a_crash_keeps_finished_cells(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    proc = subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(db), "die"], capture_output=True, text=True)
    run_id = int(proc.stdout.split()[0])
    again = Store(db)
    assert again.run(run_id)["state"] == "interrupted"
    jobs = {j["model"]: j for j in again.jobs(run_id)}
    assert jobs["a"]["state"] == "passed" and jobs["a"]["measurements"]["avg_ts"] == 42.0
    assert jobs["b"]["state"] == "interrupted"
    next_run = again.new_run({})
    again.set_state(again.add_job(next_run, Cell("a", "local", "cpu")), "passed", avg_ts=50.0)
    assert again.previous(next_run, "a@cpu@local")["avg_ts"] == 42.0


def test_opening_the_store_leaves_another_process_s_live_run_alone(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(db), "live"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        run_id = int(proc.stdout.readline().split()[0])
        beside = Store(db)  # a dashboard opening the same results.db while a headless run goes on
        assert beside.run(run_id)["state"] == "running"
        assert {j["model"]: j["state"] for j in beside.jobs(run_id)} == {"a": "passed", "b": "running"}
        beside.close()
    finally:
        proc.communicate("", timeout=30)
    assert Store(db).run(run_id)["state"] == "interrupted"  # it ended without finishing its run


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_headless_lost_pool_cells_and_the_config_matrix(tmp_path: Path, models_dir: Path) -> None:
    cfg = tmp_path / "config.toml"
    gone = {"name": "gone", "transport": "ssh", "host": "127.0.0.1", "port": _closed_port()}
    cfg.write_text(
        tomli_w.dumps({"pools": [{"name": "local", "models_dir": str(models_dir)}, gone], "matrix": {"max_tokens": 4}})
    )
    out, db = tmp_path / "exports" / "today", tmp_path / "r.db"
    proc = matrix_cli(cfg, "--out", str(out), "--db", str(db))
    assert proc.returncode == 0, proc.stdout + proc.stderr  # nothing failed; the lost pool is said, not failed
    assert f"created {out}" in proc.stdout and (out / "MODEL_SUPPORT.md").exists()
    [lost] = [line for line in proc.stdout.splitlines() if "tiny-test@cpu@gone" in line]
    assert "] pool lost  tiny-test@cpu@gone  pool lost: cannot connect" in lost
    assert "Passed: 1  Failed: 0  Skipped: 0  Pool lost: 1  Cancelled: 0" in proc.stdout
    store = Store(db)
    run = store.runs()[0]
    assert json.loads(run["settings"])["max_tokens"] == 4  # [matrix] max_tokens, with no --max-tokens
    passed = next(j for j in store.jobs(run["id"]) if j["state"] == "passed")
    assert passed["measurements"]["n_gen"] == 4
    store.close()


def test_headless_refuses_unknown_models_and_runs_that_test_nothing(tmp_path: Path, models_dir: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(tomli_w.dumps({"pools": [{"name": "local", "models_dir": str(models_dir)}]}))
    typo = matrix_cli(cfg, "--models", "tiny-test,tiny-tset", "--out", str(tmp_path), "--db", str(tmp_path / "r.db"))
    assert typo.returncode == 1 and typo.stdout.count("\n") <= 1, typo.stdout  # no cell ran
    assert typo.stderr.startswith("rbee-tui: error: model(s) tiny-tset registered on no selected pool (checked local)")
    assert typo.stderr.count("\n") == 1
    # A pool that offers only a backend this machine lacks: every cell is skipped, and that is not a success.
    cfg.write_text(tomli_w.dumps({"pools": [{"name": "local", "models_dir": str(models_dir), "backends": ["metal"]}]}))
    none = matrix_cli(cfg, "--out", str(tmp_path), "--db", str(tmp_path / "r.db"))
    assert none.returncode == 1, none.stdout + none.stderr
    assert "Passed: 0  Failed: 0  Skipped: 1  Pool lost: 0  Cancelled: 0" in none.stdout
    assert none.stderr == "rbee-tui: error: no cell was tested: 1 skipped, 0 on lost pools\n"


def test_runs_lists_the_store_and_export_makes_its_directory(tmp_path: Path) -> None:
    cfg, db = tmp_path / "config.toml", tmp_path / "r.db"
    cfg.write_text("")
    missing = tui_cli(cfg, "matrix", "runs", "--db", str(db))
    assert missing.returncode == 1 and missing.stderr.startswith(f"rbee-tui: error: no results database at {db}")
    assert not db.exists(), "a command that only looks must not create the database"
    store = Store(db)
    first = store.new_run({"models": ["a", "b"]})
    measured = {"load_s": 0.5, "ttft_ms": 12.0, "pp_avg_ts": 300.0, "avg_ts": 90.0, "n_prompt": 6, "n_gen": 16}
    store.set_state(store.add_job(first, Cell("a", "local", "cpu")), "passed", **measured)
    store.set_state(store.add_job(first, Cell("b", "local", "cpu")), "failed", "could not load")
    store.finish_run(first)
    second = store.new_run({"models": ["a"]})
    store.set_state(store.add_job(second, Cell("a", "local", "cpu")), "cancelled")
    store.finish_run(second, "cancelled")
    store.close()

    listed = tui_cli(cfg, "matrix", "runs", "--db", str(db))
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "Started", "State", "Cells", "Passed", "Failed"]
    assert [row.split()[:1] + row.split()[3:] for row in rows] == [
        [str(second), "cancelled", "1", "0", "0"],
        [str(first), "finished", "2", "1", "1"],
    ]
    doc = json.loads(tui_cli(cfg, "matrix", "runs", "--db", str(db), "--json").stdout)
    assert [(r["id"], r["state"], r["cells"], r["passed"], r["failed"], r["cancelled"]) for r in doc["runs"]] == [
        (second, "cancelled", 1, 0, 0, 1),
        (first, "finished", 2, 1, 1, 0),
    ]

    out = tmp_path / "not" / "yet"
    exported = tui_cli(cfg, "matrix", "export", "--db", str(db), "--run", str(first), "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.splitlines()[0] == f"created {out}"
    assert (out / "MODEL_SUPPORT.md").exists() and (out / f"matrix-run-{first}.csv").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for target in (blocker, blocker / "below"):
        bad = tui_cli(cfg, "matrix", "export", "--db", str(db), "--out", str(target))
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and str(target) in bad.stderr, bad.stderr
