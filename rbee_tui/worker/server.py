"""`rbee-worker`: an aiohttp server around one llama.cpp model: /health, /execute (SSE), /cancel, OpenAI routes.

The server listens before the model is loaded, so /health can say "loading". jobs.py holds the queue,
openai_api.py the OpenAI routes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import uuid

from aiohttp import web

from rbee_tui import __version__
from rbee_tui.errors import RbeeError
from rbee_tui.worker import openai_api
from rbee_tui.worker.engines import LlamaCppEngine
from rbee_tui.worker.jobs import WORKER, Job, JobDone, JobFailed, TokenOut, Worker, events
from rbee_tui.worker.requests import BadRequest, build_request, job_id
from rbee_tui.worker.settings import (
    EXIT_BIND_FAILED,
    EXIT_LOAD_FAILED,
    announce,
    build_parser,
    fail,
    listen,
    setup_logging,
)
from rbee_tui.worker.sse import MAX_BODY, last_resort, open_stream, read_body, sse

__all__ = ["Job", "Worker", "build_app", "main"]
log = logging.getLogger("rbee-worker")


# -- HTTP -------------------------------------------------------------------------------------------------


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _ready(worker: Worker) -> web.Response | None:
    if worker.status != "ready":
        return _error(503, f"the model is {worker.status}")
    return None


async def health(request: web.Request) -> web.Response:
    """GET /health: loading (503), ready or busy."""
    status, body = request.app[WORKER].health()
    return web.json_response(body, status=status)


async def execute(request: web.Request) -> web.StreamResponse:
    """POST /execute: token events, then one summary event."""
    worker = request.app[WORKER]
    if (not_ready := _ready(worker)) is not None:
        return not_ready
    try:
        body = await read_body(request)
        req = build_request(body, worker.engine.n_ctx, openai=False)
        job = worker.submit(req, job_id(body, f"job-{uuid.uuid4().hex[:12]}"))
    except BadRequest as exc:
        return _error(exc.status, str(exc))
    resp = await open_stream(request)
    try:
        i = 0
        async for event in events(job):
            match event:
                case TokenOut(text=text, id=tok):
                    await resp.write(sse("token", {"t": text, "id": tok, "i": i}))
                    i += 1
                case JobDone(summary=summary):
                    done = {"job_id": job.id, **summary.to_json()}
                    done.update(arrival_seq=job.arrival_seq, started_seq=job.started_seq)
                    await resp.write(sse("done", done))
                case JobFailed(message=message):
                    await resp.write(sse("error", {"job_id": job.id, "error": message}))
        await resp.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        job.cancel.set()  # the client went away: stop generating for nobody
        raise
    return resp


async def cancel(request: web.Request) -> web.Response:
    """POST /cancel/{job_id}: stop a queued or running job."""
    worker = request.app[WORKER]
    jid = request.match_info["job_id"]
    job = worker.jobs.get(jid)
    if job is None:
        return _error(404, f"no queued or running job {jid!r}")
    job.cancel.set()
    return web.json_response({"job_id": jid, "cancelled": True, "state": job.state})


def build_app(worker: Worker) -> web.Application:
    """The aiohttp application of a worker."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[last_resort])
    app[WORKER] = worker
    app.router.add_get("/health", health)
    app.router.add_post("/execute", execute)
    app.router.add_post("/cancel/{job_id}", cancel)
    openai_api.add_routes(app)
    return app


# -- process ----------------------------------------------------------------------------------------------


async def serve(args: argparse.Namespace) -> int:
    """Listen, load, serve until SIGTERM/SIGINT; return the exit status."""
    from rbee_tui.gguf_file import check_header as check_gguf_header

    try:
        check_gguf_header(args.model)
    except RbeeError as exc:
        return fail(EXIT_LOAD_FAILED, f"cannot load the model: {exc.message}")
    engine = LlamaCppEngine(args.model, args.backend, args.gpu, args.n_ctx, verbose=args.verbose)
    worker = Worker(engine, args.model_id or os.path.basename(args.model), args.worker_id or f"worker-{os.getpid()}")
    runner = await listen(build_app(worker), args)
    if isinstance(runner, str):
        return fail(EXIT_BIND_FAILED, runner)
    stop = announce(args, __version__)
    queue_task = asyncio.create_task(worker.run_queue())
    load_task = asyncio.create_task(worker.load())
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if worker.status == "failed":
        code = fail(EXIT_LOAD_FAILED, f"cannot load the model: {worker.load_error}")
    else:
        await stop_task
        log.info("stopping: %d job(s) cancelled", len(worker.jobs))
    worker.cancel_all()
    await runner.shutdown()
    await runner.cleanup()
    queue_task.cancel()
    if not load_task.done():
        await load_task  # a load in progress cannot be interrupted; let it finish before freeing it
    engine.close()
    log.info("stopped")
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rbee-worker`."""
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
