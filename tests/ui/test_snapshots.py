"""Snapshots of the main screens at a fixed size, fed with fixed data through the same render path."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from rbee_tui.app import RbeeApp
from rbee_tui.config import Config, PoolConfig
from rbee_tui.sample import Sample

GIB = 1024**3


def sample(i: int) -> dict[str, Any]:
    """A fixed sample, varying smoothly with `i` so sparklines have a shape."""
    used = int((6 + (i % 10) * 0.3) * GIB)
    return {
        "ts": 1760000000.0 + i,
        "interval_s": 1.0,
        "ram": {
            "total": 32 * GIB,
            "available": 32 * GIB - used,
            "used": used,
            "percent": round(100 * used / (32 * GIB), 2),
        },
        "swap": {"total": 8 * GIB, "used": GIB // 2},
        "cpu": {"percent": 20.0 + (i % 7) * 5, "per_core": [30.0, 10.0, 25.0, 15.0]},
        "load": [1.5, 1.2, 0.9],
        "disk": {"read_bps": 1.2e6, "write_bps": 3.4e5},
        "net": {"rx_bps": 2.5e4, "tx_bps": 1.1e4},
        "temps": {"cpu_c": 61.0, "gpus_c": [84.0]},
        "gpus": [
            {
                "index": 0,
                "name": "NVIDIA RTX 3090",
                "memory_used": 22 * GIB,
                "memory_total": 24 * GIB,
                "util_percent": 97.0,
                "temp_c": 84.0,
                "power_w": 331.0,
            }
        ],
        "workers": [
            {
                "id": "worker-cuda-0",
                "model": "mistral",
                "backend": "cuda",
                "gpu": 0,
                "port": 8000,
                "pid": 4243,
                "alive": True,
                "rss_bytes": 900 * 1024**2,
                "vram_bytes": 15 * GIB,
            }
        ],
        "agent_cpu_ms": 1.4,
        "agent_cpu_total_s": 0.6,
    }


CATALOG = {
    "version": "1.0",
    "pool_id": "gpu-box",
    "models": [
        {
            "id": "qwen-0.5b",
            "name": "Qwen2.5 0.5B Instruct",
            "architecture": "qwen2",
            "size_bytes": 491400032,
            "downloaded": True,
            "backends": ["cpu", "cuda", "metal"],
        },
        {
            "id": "mistral",
            "name": "Mistral 7B Instruct v0.2",
            "architecture": "llama",
            "size_bytes": 4368439584,
            "downloaded": True,
            "backends": ["cpu", "cuda", "metal"],
        },
        {
            "id": "phi3",
            "name": "Phi-3 Mini 4K Instruct",
            "architecture": "phi3",
            "size_bytes": 2393231072,
            "downloaded": False,
            "backends": ["cpu", "cuda", "metal"],
        },
    ],
}


def staged(tmp_path: Path) -> RbeeApp:
    config = Config(
        pools=(
            PoolConfig(
                name="gpu-box",
                transport="ssh",
                host="gpu-box.home.arpa",
                backends=("cuda",),
                models_dir=str(tmp_path / "m"),
            ),
            PoolConfig(
                name="mac", transport="ssh", host="mac.home.arpa", backends=("metal",), models_dir=str(tmp_path / "m")
            ),
        )
    )
    return RbeeApp(config, autostart=False)


async def inject(app: RbeeApp) -> None:
    """Put fixed state where the pool clients would, then render it the way live events do."""
    while not app.dashboard.query("PoolList"):
        await asyncio.sleep(0.01)
    box = app.fleet.client("gpu-box").view
    box.state = "connected"
    box.status = {
        "hostname": "gpu-box",
        "os": "Linux 6.1.0",
        "cpu_count": 4,
        "backends": ["cpu", "cuda"],
        "gpus": [{"index": 0, "name": "NVIDIA RTX 3090", "memory_total": 24 * GIB}],
    }
    for i in range(40):
        box.history.append(Sample.parse(sample(i)))
    box.last_sample = box.history[-1]
    box.workers = [
        {
            "id": "worker-cuda-0",
            "model": "mistral",
            "backend": "cuda",
            "gpu": 0,
            "port": 8000,
            "state": "ready",
            "started_at": time.time() - 125.2,
            "engine": "llama-cpp-python",
        }
    ]
    app.fleet.catalogs["gpu-box"] = CATALOG
    app.fleet.last_tps[("gpu-box", "worker-cuda-0", box.workers[0]["started_at"])] = 41.7
    mac = app.fleet.client("mac").view
    mac.state, mac.reason = "lost", "cannot connect to mac.home.arpa:22: Connection refused"
    app.dashboard.redraw()


SIZE = (120, 40)


@pytest.mark.parametrize(
    "keys",
    [(), ("3",), ("4",), ("o",), ("question_mark",), ("2",), ("down", "1"), ("down", "4")],
    ids=["catalog", "workers", "gauges", "overview", "help", "downloads-empty", "lost-catalog", "lost-gauges"],
)
def test_screens(snap_compare, tmp_path: Path, keys: tuple[str, ...]) -> None:
    async def before(pilot) -> None:
        await inject(pilot.app)
        await pilot.press(*keys)
        await pilot.pause(0.3)
        if keys == ("o",):
            for pool in ("gpu-box", "mac"):
                pilot.app.render_card(pool)
            await pilot.pause(0.1)

    assert snap_compare(staged(tmp_path), terminal_size=SIZE, run_before=before)


def test_spawn_dialog(snap_compare, tmp_path: Path) -> None:
    async def before(pilot) -> None:
        await inject(pilot.app)
        await pilot.press("3", "s")
        await pilot.pause(0.3)

    assert snap_compare(staged(tmp_path), terminal_size=SIZE, run_before=before)


def test_small_terminal(snap_compare, tmp_path: Path) -> None:
    async def before(pilot) -> None:
        await inject(pilot.app)
        await pilot.pause(0.2)

    assert snap_compare(staged(tmp_path), terminal_size=(80, 24), run_before=before)
