"""The sharding planner on the seeds' own figures: four 96 GB nodes, and 71 GB against 62 GB free."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from rbee_tui.cluster.layers import ModelShape, read_shape, swa_pattern
from rbee_tui.cluster.planner import (
    GB,
    NodeFree,
    Placement,
    Refusal,
    kv_layer_bytes,
    layer_devices,
    plan,
)
from rbee_tui.errors import RbeeError
from rbee_tui.tinymodel import TinySpec, write_model

CTX = 8192


def synthetic(total: float, n_layer: int, n_embd: int, n_vocab: int, n_ff: int, n_head: int) -> ModelShape:
    """A model of `total` bytes in f16 with llama's layout: 8 KV heads of 128, embeddings not tied."""
    emb = n_vocab * n_embd * 2
    layer = int((total - 2 * emb) / n_layer)
    return ModelShape(
        arch="llama",
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=8,
        head_dim_k=128,
        head_dim_v=128,
        n_ff=n_ff,
        n_vocab=n_vocab,
        n_ctx_train=131072,
        layer_bytes=(layer,) * n_layer,
        input_bytes=emb,
        output_bytes=emb,
    )


# The seed's four test models (003): sizes as listed, shapes of Llama 3.1 8B, Qwen2.5 32B, Mixtral 8x7B, Llama 3.1 70B.
LLAMA_8B = synthetic(16 * GB, 32, 4096, 128256, 14336, 32)
QWEN_32B = synthetic(64 * GB, 64, 5120, 152064, 27648, 40)
MIXTRAL = synthetic(90 * GB, 32, 4096, 32000, 14336, 32)
LLAMA_70B = synthetic(140 * GB, 80, 8192, 128256, 28672, 64)
FOUR = [NodeFree(f"node{i}", 96 * GB) for i in range(1, 5)]


def check(p: Placement, shape: ModelShape) -> None:
    """Invariants of every placement: whole layers, contiguous, in node order, each node within its room."""
    assert [s.name for s in p.shares] == sorted((s.name for s in p.shares), key=[n.name for n in FOUR + SEEDS].index)
    assert p.shares[0].first_layer == 0 and p.shares[-1].stop_layer == shape.n_layer
    for a, b in zip(p.shares, p.shares[1:], strict=False):
        assert a.stop_layer == b.first_layer
    assert all(len(s.layers) > 0 and s.total_bytes <= s.usable_bytes for s in p.shares)
    assert [s.coordinator for s in p.shares] == [True] + [False] * (len(p.shares) - 1)
    assert [s.output for s in p.shares] == [False] * (len(p.shares) - 1) + [True]
    assert sum(s.weight_bytes for s in p.shares) == shape.weight_bytes
    if p.distributed:
        # llama.cpp's own arithmetic puts every layer, and the output layer, where the plan says.
        devices = layer_devices(p.tensor_split, shape.n_layer, p.n_gpu_layers)
        expected = [i for i, s in enumerate(p.shares) for _ in s.layers] + [len(p.shares) - 1]
        assert devices == expected


@pytest.mark.parametrize("shape", [LLAMA_8B, QWEN_32B], ids=["16GB", "64GB"])
def test_fewest_keeps_models_that_fit_on_one_node(shape: ModelShape) -> None:
    p = plan(shape, FOUR, CTX)
    check(p, shape)
    assert [s.name for s in p.shares] == ["node1"]
    assert not p.distributed
    assert p.server_args() == ["-ngl", "0", "-c", str(CTX), "--fit", "off"]
    assert "node2: not needed" in p.left_out


def test_fewest_puts_140gb_on_two_nodes_with_exact_arguments() -> None:
    p = plan(LLAMA_70B, FOUR, CTX)
    check(p, LLAMA_70B)
    assert [(s.name, s.first_layer, s.stop_layer) for s in p.shares] == [("node1", 0, 40), ("node2", 40, 80)]
    assert p.tensor_split == (40, 41)  # the output layer counts as the 81st layer, on the last node
    assert p.server_args() == [
        "--rpc",
        "node1:50052,node2:50052",
        "--tensor-split",
        "40,41",
        "-ngl",
        "81",
        "-c",
        str(CTX),
        "--fit",
        "off",
    ]


def test_90gb_needs_two_nodes_with_the_default_margin_and_one_with_a_thin_one() -> None:
    # 90 GB of weights plus 1.1 GB of KV cache at 8k context and ~0.5 GB of buffers: the default margin keeps
    # 10% of 96 GB free, leaving 86.4 GB, so it takes two nodes; keeping only 2% leaves 94 GB, and one will do.
    two = plan(MIXTRAL, FOUR, CTX)
    check(two, MIXTRAL)
    assert [s.name for s in two.shares] == ["node1", "node2"]
    assert two.needed_bytes > 86.4 * GB
    one = plan(MIXTRAL, FOUR, CTX, margin=0.02)
    check(one, MIXTRAL)
    assert [s.name for s in one.shares] == ["node1"]
    assert 90 * GB < one.shares[0].total_bytes <= 0.98 * 96 * GB


def test_a_pools_own_room_replaces_the_margin() -> None:
    # memory_budget/reserve in a pool's config (rbee_tui/capacity.py) give its room: the planner keeps no margin
    # of its own there, and never counts more than is free.
    roomy = [replace(n, limit_bytes=95 * GB) for n in FOUR]
    one = plan(MIXTRAL, roomy, CTX)
    assert [s.name for s in one.shares] == ["node1"] and one.shares[0].usable_bytes == 95 * GB
    tight = [replace(n, limit_bytes=30 * GB) for n in FOUR]
    assert len(plan(MIXTRAL, tight, CTX).shares) == 4  # 30 GB each: the whole fleet, whatever is free
    with pytest.raises(Refusal, match="each pool's memory_budget/reserve"):
        plan(MIXTRAL, [replace(n, limit_bytes=20 * GB) for n in FOUR], CTX)
    assert NodeFree("n", 10 * GB, limit_bytes=40 * GB).usable_bytes(0.1) == 10 * GB


@pytest.mark.parametrize("shape", [LLAMA_8B, QWEN_32B, MIXTRAL, LLAMA_70B], ids=["16GB", "64GB", "90GB", "140GB"])
def test_spread_uses_all_four_nodes_evenly(shape: ModelShape) -> None:
    p = plan(shape, FOUR, CTX, policy="spread")
    check(p, shape)
    assert [s.name for s in p.shares] == ["node1", "node2", "node3", "node4"]
    counts = [len(s.layers) for s in p.shares]
    assert max(counts) - min(counts) <= 1
    assert p.server_args()[:2] == ["--rpc", "node1:50052,node2:50052,node3:50052,node4:50052"]
    assert p.n_gpu_layers == shape.n_layer + 1


# The seed's 70B test (004): a 71 GB need against 15.5 + 31.3 + 15.3 GB free, the GPU node's RPC server down.
LLAMA_70B_Q = synthetic(68.5 * GB, 80, 8192, 128256, 28672, 64)
SEEDS = [
    NodeFree("node1", int(15.5 * GB)),
    NodeFree("node2", int(31.3 * GB)),
    NodeFree("node3", int(15.3 * GB)),
    NodeFree("node4", 48 * GB, down_reason="down"),
]


def test_71gb_against_62gb_free_is_refused_with_both_numbers() -> None:
    with pytest.raises(Refusal) as err:
        plan(LLAMA_70B_Q, SEEDS, 4096)
    assert str(err.value).startswith("needs 71 GB, 62 GB free across 3 nodes; node4 is down")
    assert err.value.needed_bytes > err.value.free_bytes
    assert "56 GB usable" in str(err.value)  # 62.1 GB less the 10% margin


def test_71gb_is_placed_once_the_fourth_node_is_up() -> None:
    nodes = [*SEEDS[:3], NodeFree("node4", 48 * GB, endpoint="10.0.0.4:50052")]
    p = plan(LLAMA_70B_Q, nodes, 4096)
    check(p, LLAMA_70B_Q)
    assert [s.name for s in p.shares] == ["node2", "node4"]  # the two largest hold it: one hop fewer
    assert p.server_args()[:2] == ["--rpc", "node2:50052,10.0.0.4:50052"]
    spread = plan(LLAMA_70B_Q, nodes, 4096, policy="spread")
    check(spread, LLAMA_70B_Q)
    assert [s.name for s in spread.shares] == ["node1", "node2", "node3", "node4"]
    by_name = {s.name: len(s.layers) for s in spread.shares}
    assert by_name["node4"] > by_name["node2"] > by_name["node1"]  # in proportion to free memory


def test_spread_leaves_out_a_node_with_no_room_for_a_layer_and_says_so() -> None:
    nodes = [*FOUR[:2], NodeFree("pi", int(0.5 * GB))]
    p = plan(LLAMA_8B, nodes, CTX, policy="spread")
    check(p, LLAMA_8B)
    assert [s.name for s in p.shares] == ["node1", "node2"]
    assert p.left_out == ("pi: no room for a layer",)


def test_a_longer_context_grows_the_kv_cache_until_it_no_longer_fits() -> None:
    nodes = [NodeFree("a", 40 * GB), NodeFree("b", 40 * GB)]
    short = plan(LLAMA_8B, nodes, 4096)
    long = plan(LLAMA_8B, nodes, 131072)
    assert sum(s.kv_bytes for s in long.shares) == 32 * sum(s.kv_bytes for s in short.shares)
    # 2 (K and V) x 8 heads x 128 x 2 bytes = 4 KiB per token and layer: 16 GiB at 128k over 32 layers
    assert sum(s.kv_bytes for s in long.shares) == 131072 * 32 * 4096
    with pytest.raises(Refusal, match="needs"):
        plan(LLAMA_8B, [NodeFree("a", 20 * GB)], 131072)
    quantized = plan(LLAMA_8B, nodes, 131072, kv_type="q8_0")
    assert quantized.server_args()[-6:] == ["-ctk", "q8_0", "-ctv", "q8_0", "--fit", "off"]


def test_sliding_window_layers_keep_a_short_cache() -> None:
    # gemma3's pattern: 5 sliding-window layers, then one global
    assert swa_pattern(12, 6) == (True,) * 5 + (False,) + (True,) * 5 + (False,)
    shape = ModelShape(
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
    # 512 x 4 slots + 512 ubatch = 2560 cells against 32768 for a global layer
    assert kv_layer_bytes(shape, 0, 32768) * 32768 == kv_layer_bytes(shape, 5, 32768) * 2560


def test_enough_memory_in_total_but_no_node_fits_a_layer_is_refused_saying_so() -> None:
    shape = synthetic(40 * GB, 4, 4096, 32000, 14336, 32)  # four layers of ~10 GB
    nodes = [NodeFree(f"n{i}", 8 * GB) for i in range(7)]  # 50 GB usable in all, 7.2 GB on each
    with pytest.raises(Refusal, match="no arrangement of whole layers fits") as err:
        plan(shape, nodes, 4096, policy="spread")
    assert err.value.needed_bytes < 0.9 * 56 * GB


def test_bad_input_gets_one_clear_line() -> None:
    with pytest.raises(RbeeError, match="unknown placement policy 'most'"):
        plan(LLAMA_8B, FOUR, CTX, policy="most")
    with pytest.raises(RbeeError, match="unknown KV cache type"):
        plan(LLAMA_8B, FOUR, CTX, kv_type="q3")
    with pytest.raises(RbeeError, match="same name"):
        plan(LLAMA_8B, [FOUR[0], FOUR[0]], CTX)
    with pytest.raises(Refusal, match="no node is up: node1 is down \\(connection refused\\)"):
        plan(LLAMA_8B, [NodeFree("node1", 96 * GB, "connection refused")], CTX)


def test_shape_of_a_generated_gguf_adds_up_to_its_tensor_bytes(tmp_path: Path) -> None:
    spec = TinySpec(n_layer=6, n_embd=128, n_head=4, n_head_kv=2, n_ff=256)
    path = write_model(tmp_path / "six.gguf", spec)
    shape = read_shape(path)
    assert (shape.arch, shape.n_layer, shape.n_embd, shape.n_head, shape.n_head_kv) == ("llama", 6, 128, 4, 2)
    assert (shape.head_dim_k, shape.head_dim_v, shape.n_ff, shape.n_ctx_train) == (32, 32, 256, 512)
    assert len(set(shape.layer_bytes)) == 1 and not shape.tied_output and not shape.swa_layers
    # every tensor is f32 here, so the file's tensor bytes are 4 x its parameter count
    assert sum(shape.layer_bytes) + shape.non_repeating_bytes == 4 * spec.param_count()
    # and, from the other end, the tensor data region of the file (tensors are 32-byte aligned, none padded)
    from gguf import GGUFReader

    reader = GGUFReader(path)
    data_start = min(t.data_offset for t in reader.tensors)
    assert shape.weight_bytes == path.stat().st_size - data_start
    p = plan(shape, [NodeFree("a", GB), NodeFree("b", GB)], 256, policy="spread")
    assert p.tensor_split == (3, 4)


def test_a_truncated_gguf_is_a_one_line_error(tmp_path: Path) -> None:
    path = write_model(tmp_path / "t.gguf", TinySpec(n_layer=3))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(RbeeError, match="truncated or malformed"):
        read_shape(cut)


def test_reported_buffers_reads_what_llama_cpp_logs_after_load() -> None:
    from rbee_tui.cluster.planner import MiB
    from rbee_tui.cluster.runtime import reported_buffers

    log = [
        "0.00.071.746 D load_tensors: layer   6 assigned to device RPC1, is_swa = 0",
        "0.00.092.643 I load_tensors:   CPU_Mapped model buffer size =     0.10 MiB",
        "0.00.092.644 I load_tensors:   CPU_Mapped model buffer size =     0.40 MiB",  # a second file of the model
        "0.00.092.670 I load_tensors: RPC0[127.0.0.1:50061] model buffer size =    24.02 MiB",
        "0.00.092.724 I load_tensors: RPC0[127.0.0.1:50062] model buffer size =    24.41 MiB",
        "0.00.095.517 I llama_context:        CPU  output buffer size =     0.00 MiB",
        "0.00.106.617 I llama_kv_cache: RPC0[127.0.0.1:50061] KV buffer size =     8.00 MiB",
        "0.00.112.085 I llama_kv_cache: size =    1.50 MiB (  2048 cells,   6 layers,  1/1 seqs)",
        "0.00.148.419 I sched_reserve: RPC0[127.0.0.1:50062] compute buffer size =    24.04 MiB",
        "0.00.148.497 I sched_reserve:        CPU compute buffer size =    13.05 MiB",
        "0.00.160.771 I srv    load_model: prompt cache is enabled, size limit: 8192 MiB",
    ]
    assert reported_buffers(log) == {
        "CPU_Mapped": {"model": round(0.50 * MiB)},
        "RPC0[127.0.0.1:50061]": {"model": round(24.02 * MiB), "KV": 8 * MiB},
        "RPC0[127.0.0.1:50062]": {"model": round(24.41 * MiB), "compute": round(24.04 * MiB)},
        "CPU": {"output": 0, "compute": round(13.05 * MiB)},
    }
    assert reported_buffers(["nothing here"]) == {}
