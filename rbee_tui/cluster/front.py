"""The port where this machine reaches a cluster's coordinator: a small HTTP relay that watches every request.

It forwards each request to the coordinator (a llama-server worker on the head, maybe through a tunnel) and
streams the answer back as it comes. Because every request passes through it, the cluster's watcher learns
when a running request stops producing anything (a half-open RPC link blocks llama-server forever), and when
the cluster fails, every running request ends with an error event that says why, not a bare broken stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

_ENDS = (b"event: done", b"[DONE]", b'"stop":true', b'"stop": true')  # how each route's stream ends
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass(eq=False)  # each request is its own: hashed by identity
class InFlight:
    """A request being answered: when it last received anything from the coordinator."""

    path: str
    started: float = field(default_factory=time.monotonic)
    last_byte: float = field(default_factory=time.monotonic)


class Front:
    """An HTTP relay on 127.0.0.1 in front of the coordinator; `fail(reason)` ends running requests with it."""

    def __init__(self, upstream: str, reason_wait: float = 5.0) -> None:
        self.upstream = upstream
        self.reason_wait = reason_wait
        self.port = 0
        self.inflight: set[InFlight] = set()
        self._reason: asyncio.Future[str] | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1:`port` (0: any free one); return the port."""
        self._reason = asyncio.get_running_loop().create_future()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    def retarget(self, upstream: str) -> None:
        """After a restart: send new requests to the new coordinator."""
        self.upstream = upstream
        if self._reason is not None and self._reason.done():
            self._reason = asyncio.get_running_loop().create_future()

    def fail(self, reason: str) -> None:
        """The cluster failed: every running request ends with `reason`."""
        if self._reason is not None and not self._reason.done():
            self._reason.set_result(reason)

    def stalled(self, after: float) -> InFlight | None:
        """A running request that has received nothing from the coordinator for `after` seconds."""
        now = time.monotonic()
        return next((r for r in self.inflight if now - r.last_byte > after), None)

    async def close(self) -> None:
        """Stop listening; running requests end."""
        self.fail("the cluster was stopped")
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _why(self) -> str:
        """The failure's reason, waiting a little for the watcher to name it."""
        assert self._reason is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.reason_wait):
                return await asyncio.shield(self._reason)
        return "the coordinator closed the stream"

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None and self._reason is not None
        if self._reason.done():
            return web.json_response({"error": f"the cluster failed: {self._reason.result()}"}, status=503)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        body = await request.read()
        entry = InFlight(request.path)
        self.inflight.add(entry)
        reason = self._reason
        try:
            try:
                upstream = await self._session.request(
                    request.method, f"{self.upstream}{request.path_qs}", headers=headers, data=body
                )
            except aiohttp.ClientError as exc:
                return web.json_response({"error": f"the coordinator is unreachable: {exc}"}, status=502)
            async with upstream:
                entry.last_byte = time.monotonic()
                out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for k, v in upstream.headers.items():
                    if k.lower() not in _HOP:
                        out.headers[k] = v
                await out.prepare(request)
                sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
                with contextlib.suppress(ConnectionError):  # the client went away: nothing to tell it
                    ended_well = await self._pump(upstream, out, entry, reason, sse)
                    if sse and not ended_well:
                        why = await self._why()
                        await out.write(_error_event(request.path, why))
                    await out.write_eof()
                return out
        finally:
            self.inflight.discard(entry)

    async def _pump(
        self, upstream: aiohttp.ClientResponse, out: web.StreamResponse, entry: InFlight, reason: Any, sse: bool
    ) -> bool:
        """Copy the answer; True when it ended by itself without an error event (a stream that breaks or that
        carries the coordinator's own error is replaced by the cluster's reason)."""
        buf = b""
        read = asyncio.ensure_future(upstream.content.readany())
        try:
            while True:
                done, _ = await asyncio.wait({read, reason}, return_when=asyncio.FIRST_COMPLETED)
                if read not in done:
                    return False  # the cluster failed under this request
                try:
                    chunk = read.result()
                except (aiohttp.ClientError, ConnectionError, asyncio.IncompleteReadError):
                    return False
                if not chunk:
                    return not sse or any(end in buf for end in _ENDS)
                entry.last_byte = time.monotonic()
                if sse:
                    buf = (buf + chunk)[-4096:]
                    if b"event: error" in chunk:
                        return False  # llama-server died under it: say why the cluster failed instead
                await out.write(chunk)
                read = asyncio.ensure_future(upstream.content.readany())
        finally:
            read.cancel()


def _error_event(path: str, reason: str) -> bytes:
    """An SSE error in the shape the route's clients read: /execute's `event: error`, else an OpenAI-style one."""
    if path.rstrip("/").endswith("/execute"):
        return f"event: error\ndata: {json.dumps({'error': f'cluster failed: {reason}'})}\n\n".encode()
    doc = {"error": {"message": f"cluster failed: {reason}", "type": "server_error", "code": 503}}
    return f"data: {json.dumps(doc)}\n\n".encode()
