"""A llama-server worker: rbee-worker's API (/health, /execute, /cancel, the OpenAI routes) in front of llama-server.

`rbee-worker --engine llama-server` starts llama.cpp's llama-server on a private loopback port (upstream.py)
and answers clients on the worker's port itself: every request goes through the same checks as the embedded
worker's (openai_check.py, the same table and errors), is forwarded with every parameter spelled out, and its
answer comes back in the embedded worker's shape (relay.py), streams relayed chunk by chunk. Requests queue
here in arrival order and run as many at once as llama-server has slots (one, unless the spawn's extra
arguments say `--parallel N`: continuous batching), so /health counts them and /cancel can drop one. When
llama-server ends, the worker ends too, with the reason; when the worker stops, llama-server stops with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from rbee_tui import __version__
from rbee_tui.errors import RbeeError
from rbee_tui.worker.openai_api import model_list, openai_error
from rbee_tui.worker.openai_check import check_chat, check_completion
from rbee_tui.worker.params import CHAT, COMPLETIONS, SERVER
from rbee_tui.worker.proxy_jobs import Job, Queue
from rbee_tui.worker.relay import Answers, Tokens, execute_body, openai_body, sse_data, upstream_error
from rbee_tui.worker.requests import BadRequest, build_request, job_id
from rbee_tui.worker.settings import EXIT_BIND_FAILED, EXIT_ENGINE_ENDED, EXIT_LOAD_FAILED, announce, fail, listen
from rbee_tui.worker.sse import MAX_BODY, last_resort, on_client_left, open_stream, read_body, sse
from rbee_tui.worker.upstream import LlamaServer, ended

log = logging.getLogger("rbee-worker")
DEFAULT_CTX = 4096  # as the embedded engine: a model's training context would reserve gigabytes of KV cache


class ProxyWorker:
    """A llama-server worker's state: llama-server, what it says about its model, the queue."""

    def __init__(self, server: LlamaServer, model_id: str, worker_id: str, backend: str, gpu: int) -> None:
        self.server = server
        self.model_id = model_id
        self.worker_id = worker_id
        self.backend = backend
        self.gpu = gpu
        self.status = "loading"
        self.queue = Queue()
        self.started = time.time()
        self.n_ctx = server.n_ctx
        self.tools_supported = False
        self.engine_version = "unknown"
        self.session: aiohttp.ClientSession | None = None

    async def load(self) -> None:
        """Wait for llama-server to load the model, then learn what it says about it."""
        t0 = time.perf_counter()
        # A connection per request: llama-server closes a kept-alive one after a few requests or seconds idle, and
        # a request written onto one it was closing failed ("Can not write request body") when requests ran side
        # by side. A loopback connect costs well under a millisecond.
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(force_close=True),
        )
        props = await self.server.ready(self.session)
        settings = props.get("default_generation_settings") or {}
        self.n_ctx = int(settings.get("n_ctx") or self.server.n_ctx)
        caps = props.get("chat_template_caps")
        # The same test the embedded worker makes of the template: it shows the model its tools and writes calls.
        self.tools_supported = caps is None or bool(caps.get("supports_tools") and caps.get("supports_tool_calls"))
        self.engine_version = str(props.get("build_info") or "unknown")
        self.queue.slots = max(1, int(props.get("total_slots") or 1))
        self.status = "ready"
        log.info(
            "model loaded in %.1f ms (n_ctx=%d, backend=%s)",
            (time.perf_counter() - t0) * 1000,
            self.n_ctx,
            self.backend,
        )

    def health(self) -> tuple[int, dict[str, Any]]:
        """The /health status code and body, as the embedded worker's."""
        if self.status != "ready":
            return 503, {"status": self.status, "model": self.model_id, "worker_id": self.worker_id, "pid": os.getpid()}
        queue = len(self.queue)
        return 200, {
            "status": "busy" if queue else "ready",
            "queue": queue,
            "model": self.model_id,
            "backend": self.backend,
            "gpu": self.gpu,
            "n_ctx": self.n_ctx,
            "pid": os.getpid(),
            "worker_id": self.worker_id,
            "engine": "llama-server",
            "engine_version": self.engine_version,
            "engine_pid": self.server.pid,
            "uptime_s": round(time.time() - self.started, 1),
        }

    def post(self, route: str, body: dict[str, Any]) -> Any:
        """A request to llama-server (an aiohttp response context)."""
        assert self.session is not None
        return self.session.post(f"{self.server.url}{route}", json=body)


PROXY = web.AppKey("proxy", ProxyWorker)


async def _until_cancelled(job: Job, work: Coroutine[Any, Any, Any]) -> bool:
    """Run `work` until it ends or `job` is cancelled; True when it was cancelled (its llama-server request is
    closed then, which stops the generation)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(job.cancel.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return True
    task.result()  # its error, if it failed
    return False


# -- routes -----------------------------------------------------------------------------------------------


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def health(request: web.Request) -> web.Response:
    """GET /health: loading (503), ready or busy."""
    status, body = request.app[PROXY].health()
    return web.json_response(body, status=status)


async def execute(request: web.Request) -> web.StreamResponse:
    """POST /execute: token events, then one summary event, as the embedded worker streams them."""
    worker = request.app[PROXY]
    if worker.status != "ready":
        return _error(503, f"the model is {worker.status}")
    try:
        body = await read_body(request)
        req = build_request(body, worker.n_ctx, openai=False)
        job = worker.queue.add(job_id(body, f"job-{uuid.uuid4().hex[:12]}"))
    except BadRequest as exc:
        return _error(exc.status, str(exc))
    tokens = Tokens()
    resp: web.StreamResponse | None = None

    async def relay() -> None:
        nonlocal resp
        tokens.started = time.perf_counter()
        async with worker.post("/completion", execute_body(req)) as up:
            if up.status != 200:
                raise upstream_error(up.status, await up.read())
            resp = await open_stream(request)
            async for data in sse_data(up.content):
                doc = _json(data)
                if "error" in doc:
                    raise RuntimeError(_message(doc["error"]))
                i = tokens.emitted
                for text, tok in tokens.feed(doc):
                    await resp.write(sse("token", {"t": text, "id": tok, "i": i}))
                    i += 1
                if tokens.final is not None:
                    return
        raise RuntimeError(_CUT)

    try:
        cancelled = not await worker.queue.turn(job) or await _until_cancelled(job, relay())
        summary = tokens.summary(cancelled)
        done = {"job_id": job.id, **summary.to_json(), "arrival_seq": job.arrival_seq, "started_seq": job.started_seq}
        if resp is None:
            resp = await open_stream(request)
        await resp.write(sse("done", done))
    except BadRequest as exc:
        if resp is None:
            return _error(exc.status, str(exc))
        await resp.write(sse("error", {"job_id": job.id, "error": str(exc)}))
    except (aiohttp.ClientError, RuntimeError) as exc:
        message = f"generation failed: {exc}"
        if resp is None:
            return _error(502, message)
        await resp.write(sse("error", {"job_id": job.id, "error": message}))
    finally:
        worker.queue.done(job)
    await resp.write_eof()
    return resp


async def cancel(request: web.Request) -> web.Response:
    """POST /cancel/{job_id}: stop a queued or running job."""
    queue = request.app[PROXY].queue
    jid = request.match_info["job_id"]
    job = queue.jobs.get(jid)
    if job is None:
        return _error(404, f"no queued or running job {jid!r}")
    state = job.state
    queue.cancel(job)
    return web.json_response({"job_id": jid, "cancelled": True, "state": state})


_CUT = "llama-server closed its answer before the end"


def _json(data: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        return {"error": f"llama-server sent something that is not JSON: {data[:80]!r}"}
    return doc if isinstance(doc, dict) else {"error": "llama-server sent something that is not an object"}


def _message(err: Any) -> str:
    return str(err.get("message") if isinstance(err, dict) else err)


async def _openai(request: web.Request, kind: str) -> web.StreamResponse:
    worker = request.app[PROXY]
    if worker.status != "ready":
        return openai_error(BadRequest(f"the model is {worker.status}", status=503))
    try:
        body = await read_body(request)
        if kind == CHAT:
            checked = check_chat(body, worker.n_ctx, worker.tools_supported, SERVER)
        else:
            checked = check_completion(body, worker.n_ctx, SERVER)
        jid = f"{'chatcmpl' if kind == CHAT else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        job = worker.queue.add(jid)
    except BadRequest as exc:
        return openai_error(exc)
    answers = Answers(kind, jid, worker.model_id, checked.include_usage)
    route = "/v1/chat/completions" if kind == CHAT else "/v1/completions"
    out: dict[str, Any] = {}
    resp: web.StreamResponse | None = None

    async def relay() -> None:
        nonlocal resp
        async with worker.post(route, openai_body(checked, body)) as up:
            if up.status != 200:
                raise upstream_error(up.status, await up.read())
            chunks: list[dict[str, Any]] = []
            if checked.stream:
                resp = await open_stream(request)
            async for data in sse_data(up.content):
                if data == "[DONE]":
                    break
                doc = _json(data)
                if "error" in doc:
                    message = _message(doc["error"])
                    if resp is None:  # a whole answer: the error is the answer
                        raise BadRequest(message, status=500)
                    await resp.write(sse(None, {"error": {"message": message, "type": "server_error"}}))
                    return
                if resp is None:
                    chunks.append(doc)
                elif (chunk := answers.chunk(doc)) is not None:
                    await resp.write(sse(None, chunk))
            else:
                raise aiohttp.ClientPayloadError(_CUT)
            if resp is None:
                out["answer"] = answers.whole(chunks)
            elif (last := answers.last()) is not None:
                await resp.write(sse(None, last))

    # A stream notices a client that left at its next write; a whole answer is watched for it.
    watch = None if checked.stream else on_client_left(request, lambda: worker.queue.cancel(job))
    try:
        if not await worker.queue.turn(job) or await _until_cancelled(job, relay()):
            if not checked.stream:
                return web.json_response(answers.cancelled(stream=False))
            resp = resp or await open_stream(request)
            await resp.write(sse(None, answers.cancelled(stream=True)))
    except BadRequest as exc:
        if resp is None:
            return openai_error(exc)
        await resp.write(sse(None, {"error": {"message": str(exc), "type": "server_error"}}))
    except (aiohttp.ClientError, ValueError) as exc:
        message = f"llama-server failed: {exc}"
        if resp is None:
            return openai_error(BadRequest(message, status=502))
        await resp.write(sse(None, {"error": {"message": message, "type": "server_error"}}))
    finally:
        if watch is not None:
            watch.cancel()
        worker.queue.done(job)
    if resp is None:
        return web.json_response(out["answer"])
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions."""
    return await _openai(request, COMPLETIONS)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    return await _openai(request, CHAT)


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the one model this worker serves."""
    worker = request.app[PROXY]
    return model_list(worker.model_id, worker.started)


def build_app(worker: ProxyWorker) -> web.Application:
    """The aiohttp application of a llama-server worker: the same routes as the embedded worker's."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[last_resort])
    app[PROXY] = worker
    app.router.add_get("/health", health)
    app.router.add_post("/execute", execute)
    app.router.add_post("/cancel/{job_id}", cancel)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    return app


# -- process ----------------------------------------------------------------------------------------------


def model_context(path: str) -> int:
    """The context a model gets when none is asked for: its own, at most DEFAULT_CTX tokens."""
    try:
        from rbee_tui.gguf_file import read

        trained = read(Path(path)).facts().get("context_length")
    except Exception:  # a model llama-server can load but this reader cannot: the default will do
        trained = None
    return min(int(trained or DEFAULT_CTX), DEFAULT_CTX)


async def serve(args: argparse.Namespace) -> int:
    """Listen, start llama-server, serve until SIGTERM/SIGINT or until llama-server ends; the exit status."""
    from rbee_tui.gguf_file import check_header as check_gguf_header

    try:
        check_gguf_header(args.model)
    except RbeeError as exc:
        return fail(EXIT_LOAD_FAILED, f"cannot load the model: {exc.message}")
    from rbee_tui.worker.upstream import find_llama_server

    try:
        binary = find_llama_server(args.llama_server)
    except RbeeError as exc:
        return fail(EXIT_LOAD_FAILED, str(exc))
    server = LlamaServer(binary, args.model, args.n_ctx or model_context(args.model), args.backend, args.gpu)
    model_id = args.model_id or os.path.basename(args.model)
    worker = ProxyWorker(server, model_id, args.worker_id or f"worker-{os.getpid()}", args.backend, args.gpu)
    # A client that goes away cancels its handler, and with it the llama-server request it was waiting on.
    runner = await listen(build_app(worker), args, handler_cancellation=True)
    if isinstance(runner, str):
        return fail(EXIT_BIND_FAILED, runner)
    stop = announce(args, __version__, ", engine llama-server")
    code = 0
    try:
        await server.start()
    except OSError as exc:
        code = fail(EXIT_LOAD_FAILED, f"cannot start llama-server ({binary}): {exc.strerror or exc}")
    else:
        log.info("llama-server pid %d on %s: %s", server.pid, server.url, " ".join(server.argv()))
        code = await _run(worker, stop)
    worker.status = "stopping"
    worker.queue.cancel_all()
    await runner.shutdown()
    rc = await server.stop()
    if worker.session is not None:
        await worker.session.close()
    await runner.cleanup()
    log.info("stopped (llama-server: %s)", ended(rc) if rc is not None else "not started")
    return code


async def _run(worker: ProxyWorker, stop: asyncio.Event) -> int:
    """Serve until asked to stop (0) or until llama-server ends (its reason logged; the exit status)."""
    load = asyncio.create_task(worker.load())
    died = asyncio.create_task(worker.server.wait())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not stopped.done() and (exc := load.exception()) is not None:
            worker.status = "failed"
            return fail(EXIT_LOAD_FAILED, f"cannot load the model: {exc}")
        await asyncio.wait({died, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stopped.done():
            log.info("stopping: %d job(s) cancelled", len(worker.queue))
            return 0
        worker.status = "failed"
        return fail(EXIT_ENGINE_ENDED, f"llama-server ended ({ended(died.result())}): {worker.server.reason()}")
    finally:
        for task in (load, died, stopped):
            task.cancel()


def main(argv: list[str] | None = None) -> int:
    """Entry point of a llama-server worker (`rbee-worker --engine llama-server`)."""
    from rbee_tui.worker.settings import build_parser, setup_logging

    args = build_parser().parse_args(argv)
    args.engine = "llama-server"
    setup_logging()
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
