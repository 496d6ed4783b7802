"""Where a worker started on demand is tried first: a GPU pool, then the one with the most free memory."""

from __future__ import annotations

from rbee_tui.config import PoolConfig
from rbee_tui.gateway.ondemand import Candidate, backend_for, in_order
from rbee_tui.pools.client import PoolClient


def test_a_gpu_backend_is_used_only_where_the_config_the_node_and_the_model_all_have_it() -> None:
    gpu_node = {"backends": ["cpu", "cuda"]}
    both = {"backends": ["cpu", "cuda"]}
    assert backend_for(("cpu", "cuda"), gpu_node, both) == "cuda"
    assert backend_for(("cpu",), gpu_node, both) == "cpu", "the pool's config does not offer it"
    assert backend_for(("cpu", "cuda"), {"backends": ["cpu"]}, both) == "cpu", "the node cannot run it"
    assert backend_for(("cpu", "cuda"), gpu_node, {"backends": ["cpu"]}) == "cpu", "the model does not take it"
    assert backend_for(("cpu", "cuda"), {}, {}) == "cpu"


def test_gpu_pools_first_then_the_most_free_memory() -> None:
    def cand(name: str, backend: str, free_gib: int) -> Candidate:
        return Candidate(name, PoolClient(PoolConfig(name=name)), backend, 0, free_gib << 30)

    order = in_order(
        [cand("big", "cpu", 64), cand("small-gpu", "cuda", 8), cand("mid", "cpu", 32), cand("gpu", "cuda", 16)]
    )
    assert [c.pool for c in order] == ["gpu", "small-gpu", "big", "mid"]
