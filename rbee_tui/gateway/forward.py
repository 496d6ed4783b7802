"""Relaying one request to one worker: a whole answer as it is, a stream event by event as it comes.

The body goes to the worker byte for byte (the gateway has checked it) and the answer comes back untouched,
so a client gets exactly what the worker says. A stream is written on as soon as each event is complete: no
answer is held back whole. When the worker (or its pool) goes away before the client got anything, `Lost`
lets the caller try elsewhere; once the client has events, the stream ends with an error event naming the
cause. A client that leaves closes the request to the worker and cancels its job there.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from rbee_tui.worker.sse import client_left, sse

_JSON = {"Content-Type": "application/json"}
_JOB_ID = re.compile(rb'"id":\s*"([^"]{1,128})"')
_DONE = b"data: [DONE]\n\n"
CANCEL_TIMEOUT_S = 5.0
LOST = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


class Lost(Exception):
    """The worker did not answer (gone, or not ready) before the client got anything: another may."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def _cause(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _headers(extra: dict[str, str], content_type: str) -> dict[str, str]:
    return {"Content-Type": content_type, **extra}


async def whole(
    request: web.Request, session: aiohttp.ClientSession, url: str, path: str, raw: bytes, extra: dict[str, str]
) -> web.Response:
    """POST a non-streamed request; the worker's answer as it is (Lost when it could not answer). A client that
    leaves before the answer closes the request to the worker, which then stops the job (it watches for that)."""

    async def ask() -> web.Response:
        async with session.post(url + path, data=raw, headers=_JSON) as up:
            body = await up.read()
            if up.status == 503:  # loading, or stopping: not an answer to give the client while another may
                raise Lost(f"it answered 503: {body[:200].decode('utf-8', 'replace')}")
            return web.Response(
                body=body, status=up.status, headers=_headers(extra, up.headers.get("Content-Type", "application/json"))
            )

    answer, left = asyncio.ensure_future(ask()), asyncio.ensure_future(client_left(request))
    try:
        await asyncio.wait({answer, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if not answer.done():
            answer.cancel()  # the client left: closing the connection to the worker cancels its job there
            with contextlib.suppress(asyncio.CancelledError, *LOST):
                await answer
    if answer.cancelled():
        return web.Response(status=499)  # nobody reads it
    try:
        return answer.result()
    except LOST as exc:
        raise Lost(_cause(exc)) from None


def _job_id(events: bytes) -> str | None:
    """The id of the worker's answer (its job there), from the first event that has one."""
    m = _JOB_ID.search(events)
    return m.group(1).decode() if m else None


async def _cancel(session: aiohttp.ClientSession, url: str, job: str) -> None:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with session.post(f"{url}/cancel/{job}", timeout=aiohttp.ClientTimeout(total=CANCEL_TIMEOUT_S)):
            pass


async def stream(
    request: web.Request,
    session: aiohttp.ClientSession,
    url: str,
    path: str,
    raw: bytes,
    extra: dict[str, str],
    explain: Callable[[str], Awaitable[str]],
    background: Callable[[Awaitable[None]], None],
) -> web.StreamResponse:
    """POST a streamed request and relay its events; `explain(cause)` words a failure for the error event."""
    try:
        up = await session.post(url + path, data=raw, headers=_JSON)
    except LOST as exc:
        raise Lost(_cause(exc)) from None
    resp: web.StreamResponse | None = None
    job: str | None = None
    finished = False
    try:
        if up.status != 200 or up.content_type != "text/event-stream":
            body = await up.read()
            if up.status == 503:
                raise Lost(f"it answered 503: {body[:200].decode('utf-8', 'replace')}")
            finished = True
            return web.Response(
                body=body, status=up.status, headers=_headers(extra, up.headers.get("Content-Type", "application/json"))
            )
        buf = b""
        cause = ""
        try:
            async for piece in up.content.iter_any():
                buf = buf + piece if buf else piece
                if buf.endswith(b"\n\n"):  # most reads end where an event does: no copy
                    out, buf = buf, b""
                else:
                    cut = buf.rfind(b"\n\n")
                    if cut < 0:
                        continue  # half an event: it goes out whole, with the rest of it
                    out, buf = buf[: cut + 2], buf[cut + 2 :]
                if resp is None:
                    resp = web.StreamResponse(headers=_headers(extra, "text/event-stream"))
                    resp.headers["Cache-Control"] = "no-cache"
                    await resp.prepare(request)
                    job = _job_id(out)
                await resp.write(out)
                if out.endswith(_DONE):
                    finished = True
        except LOST as exc:
            cause = _cause(exc)
        if not finished and not cause:
            cause = "the stream ended before its end ([DONE])"
        if cause:
            if resp is None:
                raise Lost(cause)
            message = await explain(cause)
            error = {"error": {"message": message, "type": "server_error", "param": None, "code": "worker_lost"}}
            await resp.write(sse(None, error) + _DONE)
            finished = True  # told: nothing left to cancel
        assert resp is not None
        await resp.write_eof()
        return resp
    finally:
        if finished:
            up.release()
        else:
            # The client left (or we failed): closing the connection stops the worker's writes, and /cancel stops
            # its job even while it is still reading the prompt and has nothing to write.
            up.close()
            if job is not None:
                background(_cancel(session, url, job))
