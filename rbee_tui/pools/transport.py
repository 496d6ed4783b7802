"""Runs `rbee-hive ... --json` on a pool. The local pool uses a subprocess; SSH pools share the same contract."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from rbee_tui.config import PoolConfig
from rbee_tui.errors import RbeeError


def hive_argv(pool: PoolConfig, *args: str) -> list[str]:
    """The argument vector of an `rbee-hive` call for `pool`, with the pool's identity and models dir."""
    return [
        *shlex.split(pool.hive_command),
        "--pool-id",
        pool.name,
        "--models-dir",
        pool.models_dir,
        *args,
        "--json",
    ]


def _local_hive(argv: list[str]) -> list[str]:
    # Prefer the rbee-hive installed beside the running interpreter, so a venv works without activation.
    if argv and argv[0] == "rbee-hive":
        candidate = Path(sys.executable).with_name("rbee-hive")
        if candidate.exists():
            return [str(candidate), *argv[1:]]
    return argv


class LocalTransport:
    """The local pool: `rbee-hive` as a child process."""

    def __init__(self, pool: PoolConfig) -> None:
        self.pool = pool

    async def run_json(self, *args: str, timeout: float = 60) -> Any:
        """Run one `rbee-hive` command and return its last JSON object; its one-line error on failure."""
        argv = _local_hive(hive_argv(self.pool, *args))
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=os.environ.copy()
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RbeeError(
                f"pool {self.pool.name}: `rbee-hive {' '.join(args)}` timed out after {timeout:.0f}s"
            ) from None
        lines = [line for line in out.decode().splitlines() if line.strip()]
        last = json.loads(lines[-1]) if lines else None
        if proc.returncode != 0:
            message = (last or {}).get("error") or err.decode().strip().splitlines()[-1:] or ["failed"]
            hint = (last or {}).get("hint")
            raise RbeeError(f"pool {self.pool.name}: {message if isinstance(message, str) else message[0]}", hint)
        return last
