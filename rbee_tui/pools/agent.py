"""The dashboard's end of `rbee-hive serve`: many `rbee-hive` calls in flight over one channel.

Each call is a JSON request with an id; answers come back in any order and are matched by id. When the agent's
channel ends, every call still waiting fails at once with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from typing import Any

from rbee_tui.errors import RbeeError


class AgentGone(RbeeError):
    """The agent's channel ended (the connection broke, or the agent was killed)."""


class Agent:
    """A running `rbee-hive serve`, reached through a channel with `lines` (its stdout) and `write` (its stdin)."""

    def __init__(self, channel: Any, hello: dict[str, Any]) -> None:
        self.channel = channel
        self.hello = hello
        self.calls = 0
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[tuple[int, str, str]]] = {}
        self._ended = ""
        self._reader = asyncio.create_task(self._read(), name="agent-reader")

    @classmethod
    async def open(cls, channel: Any, timeout: float = 30.0) -> Agent:
        """Wait for the agent's greeting; a node whose rbee-hive has no `serve` ends the channel instead."""
        lines = channel.lines.__aiter__()
        try:
            async with asyncio.timeout(timeout):
                first = await lines.__anext__()
            hello = json.loads(first)
            if not isinstance(hello, dict) or "serve" not in hello:
                raise ValueError(first[:200])
        except (StopAsyncIteration, TimeoutError, ValueError) as exc:
            await channel.close()
            raise AgentGone(f"rbee-hive serve did not start: {type(exc).__name__} {exc}".strip()) from None
        return cls(channel, hello)

    @property
    def alive(self) -> bool:
        return not self._ended

    async def _read(self) -> None:
        reason = "the agent ended"
        try:
            async for line in self.channel.lines:
                try:
                    answer = json.loads(line)
                    future = self._waiting.pop(answer["id"])
                except (ValueError, KeyError, TypeError):
                    continue  # not an answer to anything still waiting
                if not future.done():
                    future.set_result((int(answer["rc"]), str(answer["out"]), str(answer["err"])))
        except asyncio.CancelledError:
            reason = "the agent was closed"
            raise
        except Exception as exc:  # the channel broke
            reason = f"the agent's channel broke: {exc or type(exc).__name__}"
        finally:
            self._end(reason)

    def _end(self, reason: str) -> None:
        self._ended = self._ended or reason
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(AgentGone(self._ended))
        self._waiting.clear()

    async def _send(self, obj: dict[str, Any]) -> None:
        try:
            await self.channel.write(json.dumps(obj) + "\n")
        except Exception as exc:
            self._end(f"the agent's channel broke: {exc or type(exc).__name__}")
            raise AgentGone(self._ended) from None

    async def run(self, args: list[str], timeout: float) -> tuple[int, str, str]:
        """Run `rbee-hive ARGS` on the node; return exit status, stdout, stderr. A timeout ends the command."""
        if self._ended:
            raise AgentGone(self._ended)
        request_id = next(self._ids)
        future: asyncio.Future[tuple[int, str, str]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        self.calls += 1
        try:
            await self._send({"id": request_id, "argv": args})
            async with asyncio.timeout(timeout):  # unlike wait_for, it never swallows the caller's cancellation
                return await asyncio.shield(future)
        except (TimeoutError, asyncio.CancelledError):
            # The caller gave up: end the command on the node too, so nothing keeps running unasked.
            if not self._ended:
                with contextlib.suppress(Exception):
                    await self._send({"id": request_id, "signal": "TERM"})
            raise
        finally:
            self._waiting.pop(request_id, None)

    async def close(self) -> None:
        """End the agent (end of its stdin) and its channel."""
        self._reader.cancel()
        await asyncio.wait({self._reader})
        await self.channel.close()
