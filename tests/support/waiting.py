"""Waiting on a condition with a timeout, never on a fixed sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def until(
    predicate: Callable[[], Any],
    timeout: float = 30,
    what: str = "",
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> float:
    """Poll `predicate` until it holds; return how long that took. Pass `sleep=pilot.pause` inside a Pilot test."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        await sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
