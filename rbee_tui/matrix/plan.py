"""Which cells a matrix has (model x pool x backend), and which of them cannot run, with the reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rbee_tui.capacity import WontFit, free_for_workers
from rbee_tui.cluster.planner import DEFAULT_MARGIN

CLUSTER_BACKEND = "rpc"  # a cluster column: llama.cpp RPC over a set of pools, the first one the head


@dataclass(frozen=True)
class Cell:
    """One test: a model on a pool with a backend (and GPU). `skip` says why it cannot run, if it cannot."""

    model: str
    pool: str
    backend: str
    gpu: int = 0
    skip: str = ""

    @property
    def key(self) -> str:
        """A stable id: model@backend@pool."""
        return f"{self.model}@{self.backend}@{self.pool}"

    @property
    def column(self) -> str:
        """The job board's column: backend@pool."""
        return f"{self.backend}@{self.pool}"

    @property
    def initial_state(self) -> str:
        """The state a job of this cell starts in: queued, or why it will not run (named the same everywhere)."""
        if not self.skip:
            return "queued"
        return "pool lost" if self.skip.startswith("pool lost") else "skipped"

    @property
    def members(self) -> tuple[str, ...]:
        """The pools this cell uses: its pool, or a cluster's pools (head first)."""
        return tuple(self.pool.split("+")) if self.backend == CLUSTER_BACKEND else (self.pool,)

    @property
    def is_cluster(self) -> bool:
        """Whether the cell is a model split over pools (`rpc@a+b+c`)."""
        return self.backend == CLUSTER_BACKEND


def cluster_cells(models: list[str], clusters: list[tuple[str, ...]], pools: dict[str, dict[str, Any]]) -> list[Cell]:
    """A cell per model and cluster (`rpc@head+node+...`): skipped when a member pool is lost or the head lacks
    the model; whether the model fits the nodes is the cluster planner's to say when the cell runs."""
    cells: list[Cell] = []
    for members in clusters:
        head = members[0]
        name = "+".join(members)
        catalog = {m["id"]: m for m in (pools.get(head, {}).get("catalog") or {}).get("models", [])}
        lost = [p for p in members if p not in pools or pools[p].get("lost")]
        for model in models:
            skip = ""
            if lost:
                why = pools.get(lost[0], {}).get("lost") or "not connected"
                skip = f"pool lost: {lost[0]}: {why}"
            elif model not in catalog:
                skip = f"{model} not registered on the head {head}"
            cells.append(Cell(model, name, CLUSTER_BACKEND, 0, skip))
    return cells


def memory_skip(model: str, pool: str, backend: str, entry: dict[str, Any], info: dict[str, Any]) -> str:
    """Why a model will not fit on a pool, from its catalog `memory` prediction and the pool's status at connect
    ("" when it fits or cannot be judged yet: a model not downloaded has no prediction, and the node checks
    again at spawn). The matrix checks once more against the pool's last sample before it starts the cell."""
    memory = entry.get("memory")
    status = info.get("status") or {}
    if not memory:
        return ""
    if backend == "cpu":
        available = status.get("ram_available")
        if not available:
            return ""
        free = free_for_workers(
            int(available), int(status.get("ram_total") or available), info.get("memory_budget"), info.get("reserve"), 0
        )
        need = int(memory["total"])
    else:
        gpus = status.get("gpus") or []
        if not gpus or not memory.get("vram"):
            return ""
        free = int(max(g["memory_total"] - g.get("memory_used", 0) for g in gpus) * (1.0 - DEFAULT_MARGIN))
        need = int(memory["vram"])
    return WontFit(need, max(free, 0), pool, what=model).message if need > free else ""


def plan(
    models: list[str],
    pools: dict[str, dict[str, Any]],
    clusters: list[tuple[str, ...]] | None = None,
) -> list[Cell]:
    """Cells for every model on every pool and backend, then on every cluster.

    `pools` maps a pool name to {"backends": configured backends, "status": rbee-hive status or {},
    "catalog": its catalog or {}, "lost": reason or "", "plain": False for a pool connected only for a
    cluster, and optionally "memory_budget" and "reserve" (bytes, the pool's config)}.
    """
    cells: list[Cell] = []
    for pool, info in pools.items():
        if not info.get("plain", True):
            continue
        status = info.get("status") or {}
        available = set(status.get("backends", info["backends"]))
        catalog = {m["id"]: m for m in (info.get("catalog") or {}).get("models", [])}
        for backend in info["backends"]:
            gpu = 0
            for model in models:
                skip = ""
                entry = catalog.get(model)
                if info.get("lost"):
                    skip = f"pool lost: {info['lost']}"
                elif backend not in available:
                    skip = f"backend {backend} not on {pool}"
                elif entry is None:
                    skip = f"{model} not registered on {pool}"
                elif backend not in entry["backends"]:
                    skip = f"{model} doesn't support {backend}"
                else:
                    skip = memory_skip(model, pool, backend, entry, info)
                cells.append(Cell(model, pool, backend, gpu, skip))
    return cells + cluster_cells(models, clusters or [], pools)
