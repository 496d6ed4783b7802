"""Which cells a matrix has (model x pool x backend), and which of them cannot run, with the reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MEMORY_MARGIN = 1.2  # a model needs its file size plus room for the KV cache and the runtime


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


def plan(
    models: list[str],
    pools: dict[str, dict[str, Any]],
) -> list[Cell]:
    """Cells for every model on every pool and backend.

    `pools` maps a pool name to {"backends": configured backends, "status": rbee-hive status or {},
    "catalog": its catalog or {}, "lost": reason or ""}.
    """
    cells: list[Cell] = []
    for pool, info in pools.items():
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
                    need = entry["size_bytes"] * MEMORY_MARGIN
                    if backend == "cuda":
                        gpus = status.get("gpus") or []
                        free = max((g["memory_total"] - g.get("memory_used", 0) for g in gpus), default=0)
                    else:
                        free = status.get("ram_available", 0)
                    if free and need > free:
                        skip = f"{model} needs {need / 1e9:.1f} GB, {pool} has {free / 1e9:.1f} GB free"
                cells.append(Cell(model, pool, backend, gpu, skip))
    return cells
