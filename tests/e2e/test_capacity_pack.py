"""Packing the local pool with tiny-test and a larger generated model under a memory budget: as many workers
start as the memory model predicts, the node refuses the next, every worker answers together, and nothing is
left running afterwards; the result is stored with its run and reaches every export."""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import tomli_w

from rbee_tui.capacity_cli import parse_models
from rbee_tui.config import Config, PoolConfig
from rbee_tui.errors import RbeeError
from rbee_tui.matrix.packing import count_fitting
from rbee_tui.matrix.store import Store
from rbee_tui.tinymodel import TinySpec, write_model
from tests.conftest import hive_cmd
from tests.support.hub import HubServer

REPO = "rbee-test/pack-GGUF"
BIG = "gen-big"


def test_models_and_counts() -> None:
    assert parse_models("tiny-test*3, gen-big") == ["tiny-test"] * 3 + ["gen-big"]
    for bad in ("", "tiny-test*0", "tiny-test*x", "no/slash"):
        with pytest.raises(RbeeError):
            parse_models(bad)
    assert count_fitting([3, 3, 3, 1], 8) == 2  # the third does not fit what is left: it stops there
    assert count_fitting([3, 3], 6) == 2 and count_fitting([9], 8) == 0


def _hive(models_dir: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        hive_cmd(*args, "--models-dir", str(models_dir), "--json"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def _processes_of(models_dir: Path) -> list[str]:
    """Processes still running a model of this pool (a worker, or the llama-server under one)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        line = " ".join(proc.info["cmdline"] or [])
        if str(models_dir) in line and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(line)
    return found


@pytest.fixture
def pool_with_big_model(tmp_path: Path, hub: HubServer) -> Path:
    """The local pool's models dir with tiny-test and a larger generated model, both downloaded."""
    path = write_model(tmp_path / f"{BIG}.gguf", TinySpec(name="gen big", n_embd=256, n_layer=4, n_ff=512, seed=12))
    hub.add(REPO, f"{BIG}.gguf", path=path)
    models = tmp_path / "models"
    _hive(models, "models", "register", BIG, "--repo", REPO, "--file", f"{BIG}.gguf")
    _hive(models, "models", "download", BIG)
    return models


def test_packing_fills_the_budget_and_leaves_nothing(tmp_path: Path, pool_with_big_model: Path) -> None:
    models_dir = pool_with_big_model
    catalog = {m["id"]: m for m in _hive(models_dir, "models", "catalog")["models"]}
    need = {m: int(catalog[m]["memory"]["total"]) for m in ("tiny-test", BIG)}
    order = [BIG, "tiny-test", BIG, "tiny-test", BIG, "tiny-test"]
    # Room for the first four and half of the fifth: the fifth is refused whatever the rounding on the node.
    budget = sum(need[m] for m in order[:4]) + need[order[4]] // 2
    pool = PoolConfig(name="local", models_dir=str(models_dir), memory_budget=budget)
    cfg, out, db = tmp_path / "config.toml", tmp_path / "out", tmp_path / "results.db"
    cfg.write_text(tomli_w.dumps(Config(pools=(pool,)).to_toml()))
    cmd = [sys.executable, "-m", "rbee_tui.cli", "--config", str(cfg), "capacity", "pack", "--pool", "local"]
    cmd += ["--models", ",".join(order), "--max-tokens", "8", "--db", str(db), "--json"]
    cmd += ["--export", "md,csv,json,html", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["budget_bytes"] == budget
    assert result["predicted_count"] == 4 and result["started"] == 4, result
    assert "needs" in result["refused"] and "local" in result["refused"], result["refused"]
    assert [w["model"] for w in result["workers"]] == order[:4]
    for w in result["workers"]:  # every worker answered, alone and among the others
        assert w["alone_tps"] > 0 and w["together_tps"] > 0 and w["rss_bytes"] > 0, w
        assert w["predicted_bytes"] == need[w["model"]]
    assert [s["count"] for s in result["steps"]] == [1, 2, 3, 4]
    assert result["ram_used_peak"] > 0
    assert result["cpu_freq_mhz"] is None or result["cpu_freq_mhz"]["min_load"] > 0
    # Nothing left: the node lists no worker, and no process started during the packing still runs.
    assert not [w for w in _hive(models_dir, "worker", "list")["workers"] if w["state"] != "exited"]
    assert not _processes_of(models_dir)
    # Stored with its run, and in every export.
    store = Store(db)
    try:
        run = store.runs()[0]
        assert store.run(run["id"])["packings"] == [{k: v for k, v in result.items() if k != "run"}]
    finally:
        store.close()
    md = (out / "MODEL_SUPPORT.md").read_text()
    assert "## Packing: local" in md and f"| 4 | tiny-test | {result['workers'][3]['worker']} |" in md
    with open(out / f"matrix-run-{run['id']}-packing.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 1 + 2 + 3 + 4  # a row per worker of every step
    assert json.loads((out / f"matrix-run-{run['id']}.json").read_text())["run"]["packings"][0]["started"] == 4
    page = (out / f"matrix-run-{run['id']}.html").read_text()
    assert "slowdown against co-resident models on local" in page


def test_a_budget_below_one_model_starts_nothing(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    need = int({m["id"]: m for m in _hive(models_dir, "models", "catalog")["models"]}["tiny-test"]["memory"]["total"])
    pool = PoolConfig(name="local", models_dir=str(models_dir), memory_budget=need // 2)
    cfg = tmp_path / "config.toml"
    cfg.write_text(tomli_w.dumps(Config(pools=(pool,)).to_toml()))
    cmd = [sys.executable, "-m", "rbee_tui.cli", "--config", str(cfg), "capacity", "pack", "--pool", "local"]
    proc = subprocess.run(
        [*cmd, "--models", "tiny-test*2", "--db", str(tmp_path / "r.db")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert "needs" in proc.stderr and "free on local" in proc.stderr, proc.stderr
    assert not [w for w in _hive(models_dir, "worker", "list")["workers"] if w["state"] != "exited"]
    assert not _processes_of(models_dir)


async def test_a_packing_cancelled_midway_stops_what_it_started(tmp_path: Path) -> None:
    from rbee_tui.matrix.packing import Packer
    from rbee_tui.pools.client import PoolClient
    from tests.support.waiting import until

    models_dir = tmp_path / "models"
    client = PoolClient(PoolConfig(name="local", models_dir=str(models_dir)))
    client.start()
    notes: list[str] = []
    try:
        await client.wait_connected(60)
        packer = Packer(client, ["tiny-test"] * 4, max_tokens=8, seconds=5, on_note=notes.append)
        run = asyncio.ensure_future(packer.run())
        # Two workers up and generating together for 5 s: the cancel lands in the middle of the load.
        await until(lambda: any(n.startswith("1 together") for n in notes), 120, "the first step")
        await until(lambda: len([w for w in client.view.workers if w["state"] != "exited"]) >= 2, 120, "two workers")
        packer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert not [w for w in await client.workers() if w["state"] != "exited"]
    finally:
        await client.close()
    assert not _processes_of(models_dir)
