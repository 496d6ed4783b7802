"""HTTP plumbing shared by the worker's routes (either engine's): reading a body, server-sent events, errors."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from rbee_tui.worker.requests import BadRequest, parse_json

MAX_BODY = 8 * 1024 * 1024


async def read_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; BadRequest (413 when too large) for anything else."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest(f"the body is larger than {MAX_BODY // (1024 * 1024)} MiB", status=413) from None
    return parse_json(raw)


def sse(event: str | None, data: Any) -> bytes:
    """One server-sent event (an unnamed one when `event` is None, as OpenAI streams are)."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def open_stream(request: web.Request) -> web.StreamResponse:
    """Start an event-stream answer."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


CLIENT_POLL_S = 0.2


async def client_left(request: web.Request) -> None:
    """Return once the client's connection has closed. aiohttp does not cancel a handler whose client left, so a
    whole (non-streamed) answer would otherwise be generated to the end for nobody."""
    while (transport := request.transport) is not None and not transport.is_closing():
        await asyncio.sleep(CLIENT_POLL_S)


def on_client_left(request: web.Request, act: Callable[[], None]) -> asyncio.Task[None]:
    """Call `act` (cancel the job) if the client leaves; cancel the returned task once the answer is written."""

    async def watch() -> None:
        await client_left(request)
        act()

    return asyncio.ensure_future(watch())


@web.middleware
async def last_resort(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A bug must not answer with aiohttp's bare "Server got itself in trouble": say what failed, keep serving."""
    try:
        return await handler(request)
    except (web.HTTPException, ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:
        logging.getLogger("rbee-worker").exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error: {type(exc).__name__}: {exc}"}, status=500)
