"""Reading every pool's catalog and status to plan a matrix (shared by the headless run and the job board)."""

from __future__ import annotations

import asyncio
from typing import Any

from rbee_tui.errors import RbeeError
from rbee_tui.matrix.plan import Cell, plan
from rbee_tui.pools.client import CONNECTED, PoolClient


async def gather_plan(
    clients: dict[str, PoolClient],
    models: list[str] | None,
    clusters: list[tuple[str, ...]] | None = None,
    plain: set[str] | None = None,
) -> tuple[list[str], list[Cell]]:
    """Connect, read every pool's catalog and status, and plan the cells."""
    models, cells, _ = await survey(clients, models, clusters, plain)
    return models, cells


async def survey(
    clients: dict[str, PoolClient],
    models: list[str] | None,
    clusters: list[tuple[str, ...]] | None = None,
    plain: set[str] | None = None,
) -> tuple[list[str], list[Cell], dict[str, dict[str, Any]]]:
    """Connect, read every pool's catalog and status, and plan the cells; also return what each pool said.

    `clusters` adds a cluster column each (its pools must be among `clients`); `plain` names the pools that get
    cells of their own (default: all of `clients`; a pool connected only for a cluster gets none).
    """
    await asyncio.gather(*(c.first_outcome(30) for c in clients.values()))
    info: dict[str, dict[str, Any]] = {}
    for name, c in clients.items():
        entry: dict[str, Any] = {
            "backends": list(c.pool.backends),
            "status": c.view.status,
            "catalog": {},
            "lost": "" if c.view.state == CONNECTED else (c.view.reason or c.view.state),
            "plain": plain is None or name in plain,
            "memory_budget": c.pool.memory_budget,  # what a cell may use there (rbee_tui/capacity.py)
            "reserve": c.pool.reserve,
        }
        if not entry["lost"]:
            try:
                entry["catalog"] = await c.hive("models", "catalog")
            except RbeeError as exc:
                entry["lost"] = str(exc)
        info[name] = entry
    if not models:
        # By default, every model that some pool already has: a plain run works offline.
        models = list(
            dict.fromkeys(m["id"] for e in info.values() for m in e["catalog"].get("models", []) if m["downloaded"])
        )
    return models, plan(models, info, clusters), info
