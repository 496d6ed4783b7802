"""The memory model against real workers, and OOM refused before it happens: on the local pool, with generated
models of several sizes and architectures, both engines, contexts of 512 and 4096."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from rbee_tui.capacity import ENGINE_EMBEDDED, ENGINE_SERVER, WontFit, predict_worker
from rbee_tui.catalog import CatalogStore
from rbee_tui.cluster.layers import read_shape
from rbee_tui.cluster.planner import MiB
from rbee_tui.cluster.runtime import reported_buffers
from rbee_tui.config import PoolConfig
from rbee_tui.matrix import export
from rbee_tui.matrix.plan import Cell
from rbee_tui.matrix.scheduler import MatrixRunner
from rbee_tui.matrix.store import Store
from rbee_tui.pools.client import PoolClient
from rbee_tui.tinymodel import TinySpec, write_model
from tests.e2e.test_llama_server import LLAMA_SERVER
from tests.support.waiting import until

# Several sizes and architectures: llama in f32 (the built-in tiny-test), llama in f16 with grouped KV heads,
# qwen2 (attention biases) with an 8k vocabulary.
MODELS = {
    "tiny-test": None,
    "gen-f16": TinySpec(name="gen f16", n_embd=512, n_layer=6, n_head=8, n_head_kv=4, n_ff=1536, n_ctx=4096, f16=True),
    "gen-qwen": TinySpec(
        name="gen qwen2",
        arch="qwen2",
        n_embd=384,
        n_layer=4,
        n_head=6,
        n_head_kv=2,
        n_ff=1024,
        n_ctx=4096,
        text_tokens=tuple(f"t{i}" for i in range(8000)),
        seed=5,
    ),
}
# About 500 tokens with these models' vocabulary: a full ubatch (512), so the compute buffer is all in use,
# and room for the reply within a context of 512.
PROMPT = ("Hello, how are you? " * 40)[:620]
PRINTED = MiB // 100  # llama.cpp prints buffer sizes to 0.01 MiB (0.125 shows as 0.12)
STARTED = time.time()


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("capacity")
    return {name: write_model(root / f"{name}.gguf", spec) for name, spec in MODELS.items() if spec is not None}


def install(hive: Callable[..., Any], models_dir: Path, generated: dict[str, Path], name: str) -> Path:
    """Register a generated model on the local pool as downloaded (no hub needed); its path."""
    hive("models", "catalog", check=True)
    if name == "tiny-test":
        return models_dir / "tiny-test" / "tiny-test.gguf"
    hive("models", "register", name, "--repo", "rbee-test/capacity", "--file", f"{name}.gguf", check=True)
    path = models_dir / name / f"{name}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(generated[name], path)
    except OSError:
        shutil.copyfile(generated[name], path)
    store = CatalogStore(models_dir, "local")
    with store.edit() as cat:
        cat.put(replace(cat.get(name), downloaded=True, size_bytes=path.stat().st_size))
    return path


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def _workers(hive: Callable[..., Any]) -> list[dict[str, Any]]:
    return json.loads(hive("worker", "list", "--json", check=True).stdout)["workers"]


def _started_here(home: Path) -> list[str]:
    """Processes started since this module was imported whose command line names this test's home: a worker or
    its supervisor would (its model path, its exit file)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["create_time"] >= STARTED and str(home) in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{proc.info['pid']} {cmd}")
    return found


ENGINES = [ENGINE_EMBEDDED, ENGINE_SERVER]


@pytest.mark.parametrize("ctx", [512, 4096])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model", list(MODELS))
def test_prediction_is_within_10_percent_of_what_the_worker_holds(
    hive: Callable[..., Any], models_dir: Path, generated: dict[str, Path], model: str, engine: str, ctx: int
) -> None:
    if engine == ENGINE_SERVER and LLAMA_SERVER is None:
        pytest.skip("llama-server is not built: run scripts/build-llama-cpp.sh (CI does)")
    path = install(hive, models_dir, generated, model)
    predicted = predict_worker(read_shape(path), ctx, "cpu", 1, engine)
    extra = (
        ["--engine", engine, "--llama-server", str(LLAMA_SERVER), "--server-args=-lv 4"]
        if engine == ENGINE_SERVER
        else []
    )
    out = hive("worker", "spawn", "cpu", "--model", model, "--n-ctx", str(ctx), "--wait", "--json", *extra)
    assert out.returncode == 0, out.stderr
    w = json.loads(out.stdout.strip().splitlines()[-1])
    try:
        loaded = w["rss_bytes"]
        answer = _post(f"{w['url']}/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0.0})
        assert answer["usage"]["prompt_tokens"] >= 480  # a full ubatch went through the model
        (row,) = [x for x in _workers(hive) if x["id"] == w["id"]]
        held = row["rss_bytes"]
        lines = json.loads(hive("worker", "logs", w["id"], "--lines", "400", "--json", check=True).stdout)["lines"]
    finally:
        hive("worker", "stop", w["id"], check=True)
    report = f"predicted {predicted.describe()}; RSS {held / MiB:.1f} MiB after the prompt, {loaded / MiB:.1f} loaded"
    assert abs(predicted.total - held) <= 0.10 * held, report
    # Once loaded, before any prompt, a worker holds no more than predicted (its compute buffer is not yet used).
    assert loaded <= 1.10 * predicted.total, report
    if engine == ENGINE_SERVER:
        # llama-server logs its buffers: the weights and the KV cache are the model's, to the printed byte.
        buffers = reported_buffers(lines)
        assert abs(buffers["CPU"]["KV"] - predicted.kv) <= PRINTED, buffers
        assert abs(buffers["CPU_Mapped"]["model"] - predicted.weights) <= PRINTED, buffers


def test_the_catalog_json_has_each_downloaded_models_memory(
    hive: Callable[..., Any], models_dir: Path, generated: dict[str, Path]
) -> None:
    path = install(hive, models_dir, generated, "gen-qwen")
    doc = json.loads(hive("models", "catalog", "--json", check=True).stdout)
    by_id = {m["id"]: m for m in doc["models"]}
    memory = by_id["gen-qwen"]["memory"]
    # The default worker: the embedded engine at the model's context, at most 4096 tokens.
    expected = predict_worker(read_shape(path), 4096, "cpu", 1, ENGINE_EMBEDDED)
    assert {k: memory[k] for k in ("weights", "kv", "compute", "overhead", "total", "ctx")} == {
        "weights": expected.weights,
        "kv": expected.kv,
        "compute": expected.compute,
        "overhead": expected.overhead,
        "total": expected.total,
        "ctx": 4096,
    }
    assert by_id["tiny-test"]["memory"]["ctx"] == 512 and by_id["tiny-test"]["memory"]["total"] > 0
    assert "memory" not in by_id["qwen-0.5b"]  # not downloaded: no shape to read
    assert (models_dir / ".shapes.json").exists()


def test_a_small_budget_refuses_the_spawn_with_numbers_and_starts_nothing(
    hive: Callable[..., Any], isolated_home: Path
) -> None:
    hive("models", "catalog", check=True)
    proc = hive("worker", "spawn", "cpu", "--model", "tiny-test", "--memory-budget", "20MB", "--json")
    assert proc.returncode == 1
    err = json.loads(proc.stdout.strip().splitlines()[-1])
    assert err["kind"] == "wont_fit" and err["pool"] == "local" and err["free_bytes"] == 20_000_000
    assert err["needed_bytes"] > err["free_bytes"]
    assert err["error"] == f"tiny-test needs {err['needed_bytes'] / 1e6:.0f} MB, 20 MB free on local"
    assert "memory_budget 20 MB" in err["hint"]
    # The same from the node's own config (a [[pools]] entry with memory_budget), in words for a terminal.
    cfg = isolated_home / "node.toml"
    cfg.write_text('[[pools]]\nname = "local"\nmemory_budget = "20 MB"\n')
    proc = hive("--config", str(cfg), "--pool", "local", "worker", "spawn", "cpu", "--model", "tiny-test")
    assert proc.returncode == 1 and "tiny-test needs " in proc.stderr and "MB, 20 MB free on local" in proc.stderr
    # A reserve larger than the machine's memory leaves no room at all.
    proc = hive("worker", "spawn", "cpu", "--model", "tiny-test", "--reserve", "100TB", "--json")
    assert proc.returncode == 1 and json.loads(proc.stdout)["free_bytes"] == 0
    # Nothing started: no worker recorded, no log, no process.
    assert _workers(hive) == []
    assert not list((isolated_home / "state").rglob("worker-*.log"))
    assert _started_here(isolated_home) == []
    # The same budget with room for it: the worker starts, and counts against the budget for the next one.
    w = json.loads(hive("worker", "spawn", "cpu", "--model", "tiny-test", "--wait", "--json", check=True).stdout)
    try:
        assert w["predicted_bytes"] == err["needed_bytes"]
        room = w["predicted_bytes"] + err["needed_bytes"] // 2
        again = hive("worker", "spawn", "cpu", "--model", "tiny-test", "--memory-budget", str(room), "--json")
        assert again.returncode == 1, again.stdout
        assert json.loads(again.stdout)["free_bytes"] <= err["needed_bytes"] // 2
        assert [x["id"] for x in _workers(hive)] == [w["id"]]
    finally:
        hive("worker", "stop", w["id"], check=True)


async def test_the_pool_client_raises_wont_fit_and_the_node_starts_nothing(
    hive: Callable[..., Any], models_dir: Path, isolated_home: Path
) -> None:
    hive("models", "catalog", check=True)
    pool = PoolConfig(name="local", models_dir=str(models_dir), memory_budget=20_000_000)
    client = PoolClient(pool, sample_interval=0.5, max_backoff=1)
    client.start()
    try:
        await client.wait_connected(30)
        with pytest.raises(WontFit) as refused:
            await client.spawn_worker("cpu", "tiny-test")
        assert refused.value.pool == "local" and refused.value.free_bytes == 20_000_000
        assert refused.value.needed_bytes > refused.value.free_bytes
        assert str(refused.value.message).startswith("tiny-test needs ")
        assert await client.workers() == []
    finally:
        await client.close()
    assert _started_here(isolated_home) == []


async def _run_cells(pool: PoolConfig, db: Path, cells: list[Cell]) -> tuple[int, Store]:
    client = PoolClient(pool, sample_interval=0.5, max_backoff=1)
    client.start()
    try:
        await client.wait_connected(30)
        await until(lambda: client.view.last_sample is not None, 30, "a first sample")
        store = Store(db)
        runner = MatrixRunner({"local": client}, store)
        run_id = await asyncio.wait_for(runner.run(cells), 300)
        assert await client.workers() == []
    finally:
        await client.close()
    return run_id, store


async def test_a_matrix_cell_that_would_not_fit_is_skipped_with_numbers(
    hive: Callable[..., Any], models_dir: Path, isolated_home: Path, tmp_path: Path
) -> None:
    hive("models", "catalog", check=True)
    pool = PoolConfig(name="local", models_dir=str(models_dir), memory_budget=20_000_000)
    run_id, store = await _run_cells(pool, tmp_path / "r.db", [Cell("tiny-test", "local", "cpu")])
    (job,) = store.jobs(run_id)
    assert job["state"] == "skipped", job
    assert job["reason"].startswith("tiny-test needs ") and job["reason"].endswith("MB, 20 MB free on local")
    m = job["measurements"]
    assert m["free_bytes"] == 20_000_000 and m["needed_bytes"] > m["free_bytes"]
    assert _started_here(isolated_home) == []
    (row,) = export.rows(store.jobs(run_id))
    assert (row["status"], row["needed_bytes"], row["free_bytes"]) == ("skipped", m["needed_bytes"], 20_000_000)


async def test_a_matrix_cell_records_predicted_against_measured(
    hive: Callable[..., Any], models_dir: Path, tmp_path: Path
) -> None:
    catalog = json.loads(hive("models", "catalog", "--json", check=True).stdout)
    memory = next(m for m in catalog["models"] if m["id"] == "tiny-test")["memory"]
    pool = PoolConfig(name="local", models_dir=str(models_dir))
    run_id, store = await _run_cells(pool, tmp_path / "r.db", [Cell("tiny-test", "local", "cpu")])
    (job,) = store.jobs(run_id)
    assert job["state"] == "passed", job
    m = job["measurements"]
    assert m["predicted_bytes"] == memory["total"]
    assert 0 < m["rss_loaded"] <= m["peak_rss"]
    assert m["overhead_bytes"] == m["peak_rss"] - memory["weights"]
    assert m["ram_used_delta"] is not None and m["ram_used_delta"] >= 0
    # This machine reports swap counters (or says it cannot); a tiny model does not push it into swap.
    assert "swap_in_out_bytes" in m and m["swapped"] is bool(m["swap_in_out_bytes"])
    # Every export carries the columns.
    rows = list(csv.DictReader(io.StringIO(export.to_csv(store.jobs(run_id)))))
    assert rows[0]["predicted_bytes"] == str(memory["total"]) and rows[0]["rss_loaded"] == str(m["rss_loaded"])
    doc = json.loads(export.to_json(store.run(run_id), store.jobs(run_id)))
    assert doc["results"][0]["overhead_bytes"] == m["overhead_bytes"]
    md = export.markdown(store.run(run_id), store.jobs(run_id))
    assert "| predicted | rss_loaded | overhead | ram_used_delta | swap |" in md
    assert "<th>predicted_bytes</th>" in export.to_html(store.run(run_id), store.jobs(run_id))
