"""The single-worker memory model (rbee_tui/capacity.py): its parts, the room a node has, the refusal's numbers,
and the catalog's `memory` object with its shape cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rbee_tui.capacity import (
    DEFAULT_CTX,
    ENGINE_EMBEDDED,
    ENGINE_OVERHEAD,
    ENGINE_SERVER,
    VOCAB_BYTES,
    MemoryPrediction,
    WontFit,
    check_fits,
    default_ctx,
    free_for_workers,
    predict_worker,
    refusal,
)
from rbee_tui.catalog import SHAPES_FILE, CatalogStore, ShapeCache, with_memory
from rbee_tui.cluster.layers import ModelShape, read_shape, swa_pattern
from rbee_tui.cluster.planner import GB, MiB, compute_bytes, coordinator_bytes, kv_layer_bytes
from rbee_tui.errors import RbeeError
from rbee_tui.sample import Sample
from rbee_tui.tinymodel import TinySpec, write_model

# Llama 3.1 8B's shape in Q4-ish sizes: 32 layers, 8 KV heads of 128, a 128k vocabulary.
LLAMA_8B = ModelShape(
    arch="llama",
    n_layer=32,
    n_embd=4096,
    n_head=32,
    n_head_kv=8,
    head_dim_k=128,
    head_dim_v=128,
    n_ff=14336,
    n_vocab=128256,
    n_ctx_train=131072,
    layer_bytes=(140_000_000,) * 32,
    input_bytes=280_000_000,
    output_bytes=430_000_000,
)


def test_the_parts_add_up_and_follow_the_context() -> None:
    p = predict_worker(LLAMA_8B, 4096, engine=ENGINE_EMBEDDED)
    assert p.total == p.weights + p.kv + p.compute + p.overhead
    assert (p.ctx, p.device, p.engine) == (4096, "cpu", ENGINE_EMBEDDED)
    assert p.weights == LLAMA_8B.weight_bytes
    # 2 (K and V) x 8 heads x 128 x 2 bytes per token and layer: 128 KiB per token over 32 layers
    assert p.kv == 4096 * 32 * 4096
    assert p.overhead == ENGINE_OVERHEAD[ENGINE_EMBEDDED] + VOCAB_BYTES * LLAMA_8B.n_vocab
    longer = predict_worker(LLAMA_8B, 8192, engine=ENGINE_EMBEDDED)
    assert longer.kv == 2 * p.kv
    # the f16 mask over every KV cell of a 512-token ubatch grows with the context; nothing else does
    assert longer.compute - p.compute == 2 * 512 * 4096
    assert "at 4096 tokens" in p.describe() and p.describe().startswith("5.")


def test_the_kv_cache_is_the_planners_to_the_byte() -> None:
    gemma = ModelShape(
        arch="gemma3",
        n_layer=12,
        n_embd=1024,
        n_head=8,
        n_head_kv=4,
        head_dim_k=256,
        head_dim_v=256,
        n_ff=4096,
        n_vocab=262144,
        n_ctx_train=32768,
        layer_bytes=(10**8,) * 12,
        input_bytes=10**9,
        output_bytes=10**9,
        sliding_window=512,
        swa_layers=swa_pattern(12, 6),
    )
    p = predict_worker(gemma, 32768, parallel=1)
    # One sequence: sliding-window layers keep window + ubatch cells, padded (not the cluster's 4 slots' worth).
    assert p.kv == sum(kv_layer_bytes(gemma, il, 32768, "f16", 1) for il in range(12))
    assert kv_layer_bytes(gemma, 0, 32768, "f16", 1) * 32768 == kv_layer_bytes(gemma, 5, 32768) * 1024


def test_the_planners_buffers_did_not_move() -> None:
    # The figures the cluster tests were fitted with, from before the planner's pieces were shared.
    s = LLAMA_8B
    old_compute = 4 * 512 * (5 * s.n_embd + 3 * s.n_ff) + 8 * 512 * 8192 + 4 * 512 * s.n_vocab + 2 * MiB + 64 * MiB
    assert compute_bytes(s, 8192, True) == old_compute
    old_host = 4 * 512 * 5 * s.n_embd + 8 * 512 * 8192 + 4 * 4 * (s.n_vocab + s.n_embd)
    assert coordinator_bytes(s, 8192) == s.input_bytes + old_host + 64 * MiB


def test_slots_engines_and_gpus() -> None:
    one = predict_worker(LLAMA_8B, 4096, engine=ENGINE_SERVER)
    four = predict_worker(LLAMA_8B, 4096, engine=ENGINE_SERVER, parallel=4)
    assert four.kv == one.kv  # the slots share one cache
    assert four.compute - one.compute == 3 * 2 * 4 * LLAMA_8B.n_vocab  # a row of logits more per slot
    assert one.overhead != predict_worker(LLAMA_8B, 4096, engine=ENGINE_EMBEDDED).overhead
    gpu = predict_worker(LLAMA_8B, 4096, "cuda")
    assert gpu.device == "cuda" and gpu.weights == LLAMA_8B.weight_bytes - LLAMA_8B.input_bytes
    assert "of GPU memory" in gpu.describe()
    small = predict_worker(LLAMA_8B, 256)  # a ubatch never exceeds the context
    assert small.compute < one.compute
    with pytest.raises(RbeeError, match="unknown engine"):
        predict_worker(LLAMA_8B, 4096, engine="vllm")
    with pytest.raises(RbeeError, match="at least 1 token"):
        predict_worker(LLAMA_8B, 0)
    with pytest.raises(RbeeError, match="parallel"):
        predict_worker(LLAMA_8B, 512, parallel=0)
    assert MemoryPrediction.from_json(one.to_json()) == one
    assert one.to_json()["total"] == one.total


def test_default_context_is_the_models_own_at_most_4096() -> None:
    assert default_ctx(512) == 512
    assert default_ctx(32768) == DEFAULT_CTX == 4096
    assert default_ctx(None) == default_ctx(0) == 4096


def test_free_for_workers() -> None:
    total, available = 32 * GB, 20 * GB
    # nothing set: available less the 10 % margin
    assert free_for_workers(available, total, None, None, 0) == 18 * GB
    # a budget: what the pool's workers may use in all, less what they use
    assert free_for_workers(available, total, 8 * GB, None, 3 * GB) == 5 * GB
    # however generous the budget, never more than is available
    assert free_for_workers(available, total, 64 * GB, None, 0) == available
    # a reserve stays free
    assert free_for_workers(available, total, None, 4 * GB, 3 * GB) == 16 * GB
    # both: the smaller room
    assert free_for_workers(available, total, 8 * GB, 15 * GB, 1 * GB) == 5 * GB
    # never below zero
    assert free_for_workers(available, total, 2 * GB, None, 3 * GB) == 0


def test_wont_fit_says_both_numbers_and_survives_the_protocol() -> None:
    p = MemoryPrediction(weights=4 * GB, kv=GB // 2, compute=GB // 2, overhead=GB // 10, ctx=4096)
    with pytest.raises(WontFit) as err:
        check_fits(p, int(3.8 * GB), "workstation")
    assert str(err.value) == "needs 5.1 GB, 3.8 GB free on workstation"
    assert (err.value.needed_bytes, err.value.free_bytes, err.value.pool) == (p.total, int(3.8 * GB), "workstation")
    check_fits(p, p.total, "workstation")  # exactly enough is enough
    small = WontFit(69_000_000, 30_000_000, "local", "room: memory_budget 30 MB", what="tiny-test")
    doc = json.loads(json.dumps(small.to_json()))
    assert doc["error"] == "tiny-test needs 69 MB, 30 MB free on local" and doc["kind"] == WontFit.KIND
    again = WontFit.from_json(doc)
    assert isinstance(again, WontFit) and isinstance(again, RbeeError)
    assert (again.message, again.hint, again.needed_bytes, again.free_bytes, again.pool) == (
        small.message,
        small.hint,
        69_000_000,
        30_000_000,
        "local",
    )


def _sample(available: int, workers: list[dict] | None = None) -> Sample:
    return Sample.parse(
        {
            "ts": 0,
            "ram": {"total": 16 * GB, "available": available, "used": 16 * GB - available, "percent": 50.0},
            "swap": {"total": 0, "used": 0},
            "cpu": {"percent": 1.0, "per_core": [1.0]},
            "net": {"rx_bps": 0, "tx_bps": 0},
            "workers": workers or [],
        }
    )


def test_refusal_from_a_sample_counts_the_pools_workers_against_its_budget() -> None:
    memory = predict_worker(LLAMA_8B, 4096).to_json()
    assert refusal(memory, _sample(10 * GB), None, None, "box") is None
    running = [{"id": "w", "alive": True, "rss_bytes": 3 * GB}]
    refused = refusal(memory, _sample(10 * GB, running), 8 * GB, None, "box", what="llama-8b")
    assert refused is not None and refused.free_bytes == 5 * GB
    assert refused.message.startswith("llama-8b needs 5.") and refused.message.endswith("5.0 GB free on box")
    assert refusal(None, _sample(GB), None, None, "box") is None  # no prediction: the node judges at spawn
    assert refusal(memory, None, None, None, "box") is None


def test_the_catalog_gives_each_downloaded_model_its_memory_and_reads_a_shape_once(tmp_path: Path) -> None:
    store = CatalogStore(tmp_path, "local")
    catalog = store.load()
    doc = with_memory(catalog, tmp_path)
    tiny = next(m for m in doc["models"] if m["id"] == "tiny-test")
    shape = read_shape(Path(tiny["path"]))
    expected = predict_worker(shape, 512, "cpu", 1, ENGINE_EMBEDDED).to_json()
    assert tiny["memory"] == {**expected, "vram": predict_worker(shape, 512, "cuda", 1, ENGINE_EMBEDDED).total}
    assert all("memory" not in m for m in doc["models"] if not m["downloaded"])
    cache = json.loads((tmp_path / SHAPES_FILE).read_text())
    assert list(cache) == [tiny["path"]]

    # A cached shape is not read again: the file's stamp is what the cache keys on. A stamp that still matches
    # keeps the cached shape, even with other bytes behind it (how a read is told from a cache hit here).
    path = Path(tiny["path"])
    st = path.stat()
    write_model(path, TinySpec(n_embd=128, n_ff=256, n_layer=3))
    bigger = path.stat().st_size
    cache[str(path)]["stamp"] = [bigger, st.st_mtime_ns]
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    (tmp_path / SHAPES_FILE).write_text(json.dumps(cache))
    assert ShapeCache(tmp_path).shape(path) == shape
    # A changed file is read again.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    again = ShapeCache(tmp_path).shape(path)
    assert (again.n_layer, again.n_embd) == (3, 128)
    assert with_memory(store.load(), tmp_path)["models"][-1]["memory"]["weights"] == again.weight_bytes


def test_a_damaged_cache_is_rebuilt_and_a_bad_file_has_no_prediction(tmp_path: Path) -> None:
    (tmp_path / SHAPES_FILE).write_text("{not json")
    good = write_model(tmp_path / "a.gguf", TinySpec(n_layer=1))
    bad = tmp_path / "b.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    shapes = ShapeCache(tmp_path).shapes([good, bad, tmp_path / "missing.gguf"])
    assert shapes[str(good)] is not None and shapes[str(good)].n_layer == 1
    assert shapes[str(bad)] is None and shapes[str(tmp_path / "missing.gguf")] is None
    assert list(json.loads((tmp_path / SHAPES_FILE).read_text())) == [str(good)]
    with pytest.raises(RbeeError):
        ShapeCache(tmp_path).shape(bad)
