"""The dashboard under load: `python -m bench.dashboard --pools 32 --workers 8` runs the real app on this terminal,
fed through the pool clients' own event path by synthetic pools that each send a metrics sample a second
(with GPUs and workers) instead of reaching a machine. The benchmark drives it from a pseudo-terminal.
`--profile SECONDS` runs it headless instead and counts the messages Textual handles, by kind and sender.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from textual.message import Message  # noqa: E402

from rbee_tui.app import RbeeApp  # noqa: E402
from rbee_tui.config import Config, PoolConfig  # noqa: E402
from rbee_tui.pools.client import CONNECTED, PoolClient, SampleReceived, WorkersListed  # noqa: E402
from rbee_tui.sample import Sample  # noqa: E402

GIB = 1 << 30


def template(workers: int) -> dict[str, Any]:
    """One real sample of this machine, with two GPUs and `workers` workers added: what a busy node sends."""
    from rbee_tui.hive.metrics import Sampler

    sample = Sampler("bench").sample()
    sample["gpus"] = [
        {
            "index": i,
            "name": "NVIDIA RTX 4090",
            "memory_total": 24 * GIB,
            "memory_used": 10 * GIB,
            "util_percent": 50.0,
            "temp_c": 60.0,
            "power_w": 250.0,
        }
        for i in range(2)
    ]
    sample["workers"] = [
        {
            "id": f"worker-cuda-{i}",
            "model": f"model-{i}",
            "backend": "cuda",
            "gpu": i % 2,
            "port": 9000 + i,
            "pid": 1000 + i,
            "alive": True,
            "rss_bytes": 2 * GIB,
            "vram_bytes": 3 * GIB,
        }
        for i in range(workers)
    ]
    return sample


def worker_list(workers: int) -> list[dict[str, Any]]:
    now = time.time()
    return [
        {
            "id": f"worker-cuda-{i}",
            "model": f"model-{i}",
            "backend": "cuda",
            "gpu": i % 2,
            "port": 9000 + i,
            "state": "ready",
            "started_at": now - 3600,
            "rss_bytes": 2 * GIB,
        }
        for i in range(workers)
    ]


async def feed(client: PoolClient, base: dict[str, Any], workers: int, phase: float) -> None:
    """Be a connected pool: status and workers once, then a changing sample every second."""
    rng = random.Random(client.pool.name)
    client.view.status = {"hostname": client.pool.name, "os": "Linux", "cpu_count": len(base["cpu"]["per_core"])}
    client.view.state = CONNECTED  # set, not announced: announcing would make the fleet fetch a catalog
    client.view.workers = worker_list(workers)
    client._emit(WorkersListed(client.pool.name, tuple(client.view.workers)))
    await asyncio.sleep(phase)  # pools do not all tick at the same instant
    while True:
        sample = copy.deepcopy(base)
        sample["ts"] = time.time()
        sample["cpu"]["percent"] = rng.uniform(5, 95)
        sample["cpu"]["per_core"] = [rng.uniform(0, 100) for _ in sample["cpu"]["per_core"]]
        sample["ram"]["percent"] = rng.uniform(20, 80)
        for gpu in sample["gpus"]:
            gpu["util_percent"] = rng.uniform(0, 100)
            gpu["memory_used"] = int(rng.uniform(2, 22) * GIB)
        for w in sample["workers"]:
            w["rss_bytes"] = int(rng.uniform(1, 3) * GIB)
        parsed = Sample.parse(sample)  # as the pool client parses what a node sends
        client.view.last_sample = parsed
        client.view.history.append(parsed)
        client._emit(SampleReceived(client.pool.name, parsed))
        await asyncio.sleep(1.0)


class LoadedApp(RbeeApp):
    """The real app; its pools are synthetic instead of connected."""

    def __init__(self, config: Config, workers: int) -> None:
        super().__init__(config, autostart=False)
        self.n_workers = workers
        self._feeders: list[asyncio.Task[None]] = []

    def on_mount(self) -> None:
        super().on_mount()
        base = template(self.n_workers)
        clients = list(self.fleet.clients.values())
        models = [
            {
                "id": f"model-{i}",
                "name": f"Model {i}",
                "architecture": "llama",
                "size_bytes": 4 * GIB,
                "downloaded": True,
                "backends": ["cpu", "cuda"],
            }
            for i in range(self.n_workers)
        ]
        for client in clients:
            self.fleet.catalogs[client.pool.name] = {"models": models}
        for i, client in enumerate(clients):
            task = asyncio.create_task(feed(client, base, self.n_workers, i / len(clients)))
            self._feeders.append(task)

    async def on_unmount(self) -> None:
        for task in self._feeders:
            task.cancel()
        await super().on_unmount()


async def profile(config: Config, workers: int, seconds: float, size: tuple[int, int] = (160, 50)) -> str:
    """Run the loaded app headless while moving through the pool list four times a second; say which messages
    Textual handled, per second, by kind and by the widget that sent them, and the app's CPU share."""
    counts: Counter[tuple[str, str]] = Counter()
    counting = False

    def hook(message: Message) -> None:
        if counting:
            counts[(type(message).__name__, type(message._sender).__name__)] += 1

    app = LoadedApp(config, workers)
    async with app.run_test(size=size, message_hook=hook):
        await asyncio.sleep(3)  # every pool has sent a sample or two
        counting = True
        t0, c0 = time.perf_counter(), time.process_time()
        at, step, presses = 0, 1, 0
        while time.perf_counter() - t0 < seconds:
            if not 0 <= at + step < len(config.pools):
                step = -step
            at += step
            await app._press_keys(["down" if step > 0 else "up"])  # what Pilot.press does, without its waits
            presses += 1
            await asyncio.sleep(0.25)
        took, cpu = time.perf_counter() - t0, time.process_time() - c0
        counting = False
    lines = [f"{took:.1f} s, {presses} presses, CPU {100 * cpu / took:.1f} % of a core; messages per second:"]
    lines += [f"{n / took:8.1f}  {kind} from {sender}" for (kind, sender), n in counts.most_common(20)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__)
    ap.add_argument("--pools", type=int, default=32)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--profile", type=float, metavar="SECONDS", help="run headless and count Textual's messages")
    args = ap.parse_args()
    pools = tuple(PoolConfig(name=f"pool-{i:02d}", models_dir=f"/nonexistent/{i}") for i in range(args.pools))
    if args.profile:
        print(asyncio.run(profile(Config(pools=pools), args.workers, args.profile)))
        return 0
    LoadedApp(Config(pools=pools), args.workers).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
