"""Cluster columns in the matrix: a model split over the local pool and two sshd pools, run headless like any
cell, its measurements and each node's memory and RPC bytes in every export; a cluster that does not fit is a
skipped cell that says needed vs free. Real processes throughout (ggml-rpc-server, SSH relays, llama-server)."""

from __future__ import annotations

import csv
import glob
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from rbee_tui.config import Config, PoolConfig, parse
from rbee_tui.errors import RbeeError
from rbee_tui.hive.rpc import build_cache
from rbee_tui.matrix.plan import plan
from rbee_tui.matrix.store import Store
from rbee_tui.tinymodel import TinySpec, write_model
from tests.support.hub import HubServer
from tests.support.site import Site
from tests.support.sshd import sshd_available

RPC = sorted(glob.glob(str(build_cache() / "*" / "bin" / "ggml-rpc-server")))
needs_cluster = pytest.mark.skipif(
    not RPC or sshd_available() is not None,
    reason=str(sshd_available() or "ggml-rpc-server is not built: run scripts/build-llama-cpp.sh"),
)
MODEL = "split6"
CLUSTER = "local+pool-a+pool-b"


# -- [matrix] clusters in the config ------------------------------------------------------------------------


def _config(matrix: dict[str, Any]) -> Config:
    pools = [{"name": "local", "transport": "local"}, {"name": "node2", "transport": "ssh", "host": "node2"}]
    return parse({"pools": pools, "matrix": matrix})


def test_config_reads_cluster_columns_and_their_context() -> None:
    cfg = _config({"clusters": ["local+node2"], "cluster_ctx": 4096})
    assert cfg.matrix.clusters == (("local", "node2"),) and cfg.matrix.cluster_ctx == 4096
    assert parse(cfg.to_toml()).matrix == cfg.matrix  # written back as read
    assert _config({}).matrix.clusters == ()


@pytest.mark.parametrize(
    ("clusters", "message"),
    [
        ("local+node2", r"matrix.clusters must be a list of clusters"),
        (["local"], r"cluster 'local' names one pool: a cluster spans two or more"),
        (["local+local"], r"cluster 'local\+local' names a pool twice"),
        (["local+node9"], r"cluster 'local\+node9' names no pool 'node9'"),
        (["local+no de"], r"invalid pool name 'no de'"),
        ([3], r"a cluster is pool names joined by '\+'"),
    ],
)
def test_config_refuses_a_bad_cluster_in_one_line(clusters: Any, message: str) -> None:
    with pytest.raises(RbeeError, match=message) as err:
        _config({"clusters": clusters})
    assert "\n" not in str(err.value)


def test_config_refuses_a_bad_cluster_context() -> None:
    with pytest.raises(RbeeError, match=r"matrix.cluster_ctx must be an integer"):
        _config({"clusters": ["local+node2"], "cluster_ctx": 0})


def test_plan_adds_a_column_per_cluster_and_skips_what_cannot_run() -> None:
    catalog = {"models": [{"id": "m", "backends": ["cpu"], "size_bytes": 1, "downloaded": True}]}

    def pool(lost: str = "", plain: bool = True, models: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"backends": ["cpu"], "status": {}, "catalog": models or {}, "lost": lost, "plain": plain}

    pools = {"a": pool(models=catalog), "b": pool(plain=False), "c": pool(lost="connection refused", plain=False)}
    cells = plan(["m"], pools, [("a", "b"), ("b", "a"), ("a", "c")])
    by = {c.column: c for c in cells}
    assert list(by) == ["cpu@a", "rpc@a+b", "rpc@b+a", "rpc@a+c"]  # b and c get no cells of their own
    assert by["rpc@a+b"].skip == "" and by["rpc@a+b"].members == ("a", "b") and by["rpc@a+b"].is_cluster
    assert by["rpc@b+a"].skip == "m not registered on the head b"  # the model file is needed on the head only
    assert by["rpc@a+c"].skip == "pool lost: c: connection refused"
    assert by["rpc@a+c"].initial_state == "pool lost"


# -- a run with a cluster column ----------------------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path, hub: HubServer, hive: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Site, Path]]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / "cache"))  # the local node's tensor cache
    gguf = write_model(
        tmp_path / "split6.gguf", TinySpec(name="rbee split", n_layer=6, n_embd=64, n_ff=128, n_ctx=2048, seed=11)
    )
    hub.add("rbee-test/split6-GGUF", "split6.gguf", data=gguf.read_bytes())
    # The model is registered on the head only: a cluster needs its file there and nowhere else.
    hive("models", "register", MODEL, "--repo", "rbee-test/split6-GGUF", "--file", "split6.gguf", check=True)
    site = Site(tmp_path, hub)
    cfg = tmp_path / "config.toml"
    pools = (PoolConfig(name="local", transport="local"), site.pools["pool-a"], site.pools["pool-b"])
    cfg.write_text(tomli_w.dumps(Config(pools=pools).to_toml()))
    yield site, cfg
    site.stop()


def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "rbee_tui.cli", "--config", str(cfg), *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`{' '.join(args)}` did not finish in 240 s:\n{exc.stdout!r}\n{exc.stderr!r}")


def _span(store: Store, job_id: int) -> tuple[float, float]:
    """From the job's first step past queued to its end."""
    times = [e["at"] for e in store.events(job_id) if e["state"] != "queued"]
    return min(times), max(times)


@needs_cluster
def test_a_cluster_column_is_measured_exported_and_leaves_nothing(lab: tuple[Site, Path], tmp_path: Path) -> None:
    _, cfg = lab
    out, db = tmp_path / "out", tmp_path / "results.db"
    proc = _cli(
        cfg,
        *("matrix", "run", "--models", MODEL, "--pools", "local", "--clusters", CLUSTER),
        *("--export", "md,csv,json,html", "--out", str(out), "--db", str(db)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"passed     {MODEL}@rpc@{CLUSTER}" in proc.stdout, proc.stdout

    doc = json.loads(next(out.glob("matrix-run-*.json")).read_text())
    row = next(r for r in doc["results"] if r["backend"] == "rpc")
    assert row["pool"] == CLUSTER and row["status"] == "passed", row
    for key in ("load_s", "ttft_ms", "avg_ts", "pp_avg_ts", "peak_rss", "n_prompt", "n_gen", "build_commit"):
        assert row[key], key
    assert row["build_commit"].startswith("llama-server ")
    nodes = {n["pool"]: n for n in row["nodes"]}
    assert list(nodes) == ["local", "pool-a", "pool-b"]
    assert sum(n["share"] for n in nodes.values()) == pytest.approx(1, abs=0.01)
    assert all(n["planned_bytes"] > 0 and n["peak_ram_used"] > 0 for n in nodes.values())
    # The relayed nodes' links are counted: the weights go over at load, far more than a prompt moves.
    for name in ("pool-a", "pool-b"):
        n = nodes[name]
        assert n["link"] == "ssh relay"
        assert n["net_load_bytes"] > n["net_decode_bytes"] > 0 and n["net_prefill_bytes"] > 0, n
    assert nodes["local"]["link"] == "loopback on the head" and nodes["local"]["net_load_bytes"] == 0
    assert row["net_load_bytes"] == nodes["pool-a"]["net_load_bytes"] + nodes["pool-b"]["net_load_bytes"]

    md = (out / "MODEL_SUPPORT.md").read_text()
    assert f"rpc@{CLUSTER}" in md and "## Clusters" in md
    cluster_lines = [ln for ln in md.split("## Clusters", 1)[1].splitlines() if ln.startswith(f"| {MODEL} |")]
    assert [ln.split("|")[4].strip() for ln in cluster_lines] == ["local", "pool-a", "pool-b"]
    with next(out.glob("matrix-run-*.csv")).open() as f:
        csv_row = next(r for r in csv.DictReader(f) if r["backend"] == "rpc")
    assert int(csv_row["net_load_bytes"]) == row["net_load_bytes"]
    assert [n["pool"] for n in json.loads(csv_row["nodes"])] == ["local", "pool-a", "pool-b"]
    page = next(out.glob("matrix-run-*.html")).read_text()
    assert "<h2>Clusters</h2>" in page and "ssh relay" in page

    # The cluster's cell never ran beside the local pool's own cell (it uses that pool).
    store = Store(db)
    try:
        jobs = {j["backend"]: j for j in store.jobs(doc["run"]["id"])}
        (a0, a1), (b0, b1) = _span(store, jobs["cpu"]["id"]), _span(store, jobs["rpc"]["id"])
    finally:
        store.close()
    assert jobs["cpu"]["state"] == "passed"
    assert a1 <= b0 or b1 <= a0, ((a0, a1), (b0, b1))

    # Nothing is left on any node: no rpc-server, no coordinator.
    for pool in ("local", "pool-a", "pool-b"):
        status = _cli(cfg, "pool", pool, "rpc", "status", "--json")
        assert status.returncode == 0 and not json.loads(status.stdout)["running"], (pool, status.stdout)
    workers = _cli(cfg, "pool", "local", "worker", "list", "--json")
    assert json.loads(workers.stdout)["workers"] == [], workers.stdout


@needs_cluster
def test_a_cluster_that_does_not_fit_is_skipped_with_its_numbers(lab: tuple[Site, Path], tmp_path: Path) -> None:
    _, cfg = lab
    out, db = tmp_path / "out", tmp_path / "results.db"
    # A 16M-token context: its KV cache and buffers are far beyond this machine's memory, three times over.
    proc = _cli(
        cfg,
        *("matrix", "run", "--models", MODEL, "--pools", "pool-a", "--clusters", CLUSTER, "--cluster-ctx"),
        *(str(1 << 24), "--export", "md,json", "--out", str(out), "--db", str(db)),
    )
    assert proc.returncode == 1 and "no cell was tested" in proc.stderr, proc.stdout + proc.stderr
    doc = json.loads(next(out.glob("matrix-run-*.json")).read_text())
    row = next(r for r in doc["results"] if r["backend"] == "rpc")
    assert row["status"] == "skipped", row
    assert row["needed_bytes"] > row["free_bytes"] > 0
    assert "needs" in row["reason"] and "free across 3 nodes" in row["reason"], row["reason"]
    md = (out / "MODEL_SUPPORT.md").read_text()
    assert "## Clusters" in md and "| skipped | needs " in md
    for pool in ("local", "pool-a", "pool-b"):
        status = _cli(cfg, "pool", pool, "rpc", "status", "--json")
        assert not json.loads(status.stdout)["running"], pool
