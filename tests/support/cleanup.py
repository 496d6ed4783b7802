"""Workers a test left behind are killed, process group and all."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def kill_workers(home: Path) -> None:
    """Whatever a test left running (it failed before stopping its workers) is killed, group and all."""
    import signal

    for registry in home.rglob("workers.json"):
        try:
            workers = json.loads(registry.read_text()).get("workers", [])
        except (OSError, ValueError):
            continue
        for w in workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(w["pid"], signal.SIGKILL)
