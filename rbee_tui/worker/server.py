"""`rbee-worker`: an aiohttp server around one llama.cpp model: /health, /execute (SSE), /cancel, OpenAI routes.

Requests queue in arrival order and run one at a time in a single generation thread; each starts from a
clean KV cache. The server listens before the model is loaded, so /health can say "loading".
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from rbee_tui import __version__
from rbee_tui.errors import RbeeError
from rbee_tui.worker.engines import GenerationSummary, LlamaCppEngine, Request, llama_cpp_version
from rbee_tui.worker.requests import BadRequest, build_request, chat_prompt, job_id, parse_json

log = logging.getLogger("rbee-worker")
EXIT_LOAD_FAILED = 2
EXIT_BIND_FAILED = 3
_DONE = object()


@dataclass
class Job:
    """One request: its tokens flow from the generation thread to the HTTP handler through `events`."""

    id: str
    request: Request
    tokens: list[int]
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "queued"
    summary: GenerationSummary | None = None
    arrival_seq: int = 0
    started_seq: int = 0


class Worker:
    """The worker's state: the engine, its status, the queue. Handlers read it; one task drains the queue."""

    def __init__(self, engine: LlamaCppEngine, model_id: str, worker_id: str) -> None:
        self.engine = engine
        self.model_id = model_id
        self.worker_id = worker_id
        self.status = "loading"
        self.load_error: str | None = None
        self.pending: deque[Job] = deque()
        self.jobs: dict[str, Job] = {}
        self.running: Job | None = None
        self.wakeup = asyncio.Event()
        self.counter = itertools.count(1)
        self.arrival_counter = itertools.count(1)
        self.started_counter = itertools.count(1)
        self.started = time.time()

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def load(self) -> None:
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(self.engine.load)
        except RbeeError as exc:
            self.load_error = exc.message
            self.status = "failed"
            return
        self.status = "ready"
        log.info(
            "model loaded in %.1f ms (n_ctx=%d, backend=%s)",
            (time.perf_counter() - t0) * 1000,
            self.engine.n_ctx,
            self.engine.backend,
        )

    async def run_queue(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
            job = self.pending.popleft()
            if job.cancel.is_set():
                # Cancelled while queued: its caller still gets a summary, with nothing generated.
                job.summary = GenerationSummary(0, len(job.tokens), 0.0, 0.0, 0.0, 0.0, "cancelled", "")
                job.events.put_nowait(("done", job.summary))
                job.events.put_nowait(_DONE)
                self.jobs.pop(job.id, None)
                continue
            job.started_seq = next(self.started_counter)
            job.state = "running"
            self.running = job

            def on_token(text: str, tok: int, job: Job = job) -> None:
                loop.call_soon_threadsafe(job.events.put_nowait, ("token", text, tok))

            try:
                job.summary = await asyncio.to_thread(
                    self.engine.generate, job.request, on_token, job.cancel, job.tokens
                )
                job.events.put_nowait(("done", job.summary))
            except Exception as exc:
                log.exception("job %s failed", job.id)
                job.events.put_nowait(("error", f"generation failed: {exc}"))
            finally:
                job.state = "done"
                self.running = None
                self.jobs.pop(job.id, None)
                job.events.put_nowait(_DONE)

    def submit(self, req: Request, jid: str | None = None) -> Job:
        jid = jid or f"job-{next(self.counter)}"
        if jid in self.jobs:
            raise BadRequest(f"job_id {jid!r} is already queued or running")
        tokens = self.engine.tokenize(req.prompt)
        if len(tokens) >= self.engine.n_ctx:
            raise BadRequest(f"the prompt is {len(tokens)} tokens; the context holds {self.engine.n_ctx}")
        job = Job(jid, req, tokens, arrival_seq=next(self.arrival_counter))
        self.jobs[jid] = job
        self.pending.append(job)
        self.wakeup.set()
        return job

    def cancel_all(self) -> None:
        for job in list(self.jobs.values()):
            job.cancel.set()

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.status != "ready":
            return 503, {"status": self.status, "model": self.model_id, "worker_id": self.worker_id, "pid": os.getpid()}
        queue = len(self.pending) + (1 if self.running else 0)
        return 200, {
            "status": "busy" if queue else "ready",
            "queue": queue,
            "model": self.model_id,
            "backend": self.engine.backend,
            "gpu": self.engine.gpu,
            "n_ctx": self.engine.n_ctx,
            "pid": os.getpid(),
            "worker_id": self.worker_id,
            "engine": self.engine.name,
            "engine_version": llama_cpp_version(),
            "uptime_s": round(time.time() - self.started, 1),
        }


# -- HTTP -------------------------------------------------------------------------------------------------

WORKER = web.AppKey("worker", Worker)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _ready(worker: Worker) -> web.Response | None:
    if worker.status != "ready":
        return _error(503, f"the model is {worker.status}")
    return None


async def _body(request: web.Request) -> dict[str, Any]:
    return parse_json(await request.read())


async def health(request: web.Request) -> web.Response:
    status, body = request.app[WORKER].health()
    return web.json_response(body, status=status)


def _sse(event: str | None, data: Any) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _open_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


async def _events(job: Job) -> Any:
    while True:
        item = await job.events.get()
        if item is _DONE:
            return
        yield item


async def execute(request: web.Request) -> web.StreamResponse:
    worker = request.app[WORKER]
    if (not_ready := _ready(worker)) is not None:
        return not_ready
    try:
        body = await _body(request)
        req = build_request(body, worker.engine.n_ctx, openai=False)
        job = worker.submit(req, job_id(body, f"job-{uuid.uuid4().hex[:12]}"))
    except BadRequest as exc:
        return _error(400, str(exc))
    resp = await _open_stream(request)
    try:
        i = 0
        async for kind, *rest in _events(job):
            if kind == "token":
                await resp.write(_sse("token", {"t": rest[0], "id": rest[1], "i": i}))
                i += 1
            elif kind == "done":
                await resp.write(
                    _sse(
                        "done",
                        {
                            "job_id": job.id,
                            **rest[0].to_json(),
                            "arrival_seq": job.arrival_seq,
                            "started_seq": job.started_seq,
                        },
                    )
                )
            else:
                await resp.write(_sse("error", {"job_id": job.id, "error": rest[0]}))
        await resp.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        job.cancel.set()  # the client went away: stop generating for nobody
        raise
    return resp


async def cancel(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    jid = request.match_info["job_id"]
    job = worker.jobs.get(jid)
    if job is None:
        return _error(404, f"no queued or running job {jid!r}")
    job.cancel.set()
    return web.json_response({"job_id": jid, "cancelled": True, "state": job.state})


def _openai_chunk(kind: str, jid: str, model: str, text: str, finish: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if kind == "chat":
        choice["delta"] = {"content": text} if text or not finish else {}
        obj = "chat.completion.chunk"
    else:
        choice["text"] = text
        obj = "text_completion"
    return {"id": jid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


async def _openai(request: web.Request, kind: str) -> web.StreamResponse:
    worker = request.app[WORKER]
    if (not_ready := _ready(worker)) is not None:
        return not_ready
    try:
        body = await _body(request)
        prompt = None
        stop_extra: tuple[str, ...] = ()
        if kind == "chat":
            llm = worker.engine.llm
            bos = llm.detokenize([llm.token_bos()]).decode("utf-8", "replace")
            eos = llm.detokenize([llm.token_eos()]).decode("utf-8", "replace")
            prompt, stop_extra = chat_prompt(body.get("messages"), worker.engine.chat_template, bos, eos)
        req = build_request(body, worker.engine.n_ctx, openai=True, prompt=prompt)
        if stop_extra:
            req = Request(**{**req.__dict__, "stop": req.stop + stop_extra})
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be true or false")
        jid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        job = worker.submit(req, jid)
    except BadRequest as exc:
        return web.json_response({"error": {"message": str(exc), "type": "invalid_request_error"}}, status=400)
    model = worker.model_id
    if not stream:
        summary: GenerationSummary | None = None
        async for kind_, *rest in _events(job):
            if kind_ == "done":
                summary = rest[0]
            elif kind_ == "error":
                return _error(500, rest[0])
        assert summary is not None
        choice: dict[str, Any] = {"index": 0, "finish_reason": summary.finish_reason, "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": summary.text}
        else:
            choice["text"] = summary.text
        return web.json_response(
            {
                "id": jid,
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": {
                    "prompt_tokens": summary.prompt_tokens,
                    "completion_tokens": summary.tokens_generated,
                    "total_tokens": summary.prompt_tokens + summary.tokens_generated,
                },
            }
        )
    resp = await _open_stream(request)
    try:
        if kind == "chat":
            first = _openai_chunk(kind, jid, model, "", None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            await resp.write(_sse(None, first))
        async for kind_, *rest in _events(job):
            if kind_ == "token":
                await resp.write(_sse(None, _openai_chunk(kind, jid, model, rest[0], None)))
            elif kind_ == "done":
                await resp.write(_sse(None, _openai_chunk(kind, jid, model, "", rest[0].finish_reason)))
            else:
                await resp.write(_sse(None, {"error": {"message": rest[0]}}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        job.cancel.set()
        raise
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, "text")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, "chat")


async def models(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": worker.model_id, "object": "model", "created": int(worker.started), "owned_by": "rbee"}],
        }
    )


def build_app(worker: Worker) -> web.Application:
    """The aiohttp application of a worker."""
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[WORKER] = worker
    app.router.add_get("/health", health)
    app.router.add_post("/execute", execute)
    app.router.add_post("/cancel/{job_id}", cancel)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    return app


# -- process ----------------------------------------------------------------------------------------------


def _fail(code: int, message: str) -> int:
    # One line, no traceback: rbee-hive shows the last line of the log as the reason.
    log.error("%s", message)
    sys.stderr.write(f"rbee-worker: error: {message}\n")
    sys.stderr.flush()
    return code


async def serve(args: argparse.Namespace) -> int:
    """Listen, load, serve until SIGTERM/SIGINT; return the exit status."""
    from rbee_tui.hive.verify import check_gguf_header

    try:
        check_gguf_header(args.model)
    except RbeeError as exc:
        return _fail(EXIT_LOAD_FAILED, f"cannot load the model: {exc.message}")
    engine = LlamaCppEngine(args.model, args.backend, args.gpu, args.n_ctx, verbose=args.verbose)
    worker = Worker(engine, args.model_id or os.path.basename(args.model), args.worker_id or f"worker-{os.getpid()}")
    runner = web.AppRunner(build_app(worker), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        if args.fd is not None:  # rbee-hive bound the port for us
            import socket

            site: web.BaseSite = web.SockSite(runner, socket.socket(fileno=args.fd))
        else:
            site = web.TCPSite(runner, args.host, args.port, reuse_address=True)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        return _fail(EXIT_BIND_FAILED, f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    log.info(
        "rbee-worker %s listening on http://%s:%d (pid %d, model %s)",
        __version__,
        args.host,
        args.port,
        os.getpid(),
        args.model,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    queue_task = asyncio.create_task(worker.run_queue())
    load_task = asyncio.create_task(worker.load())
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if worker.status == "failed":
        code = _fail(EXIT_LOAD_FAILED, f"cannot load the model: {worker.load_error}")
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


def build_parser() -> argparse.ArgumentParser:
    """`rbee-worker` arguments."""
    ap = argparse.ArgumentParser(prog="rbee-worker", description="Serve one GGUF model over HTTP with llama.cpp.")
    ap.add_argument("--model", required=True, help="path of the .gguf file")
    ap.add_argument("--model-id", help="the catalog id, reported by /health and /v1/models")
    ap.add_argument("--worker-id")
    ap.add_argument("--backend", choices=["cpu", "cuda", "metal"], default="cpu")
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--n-ctx", type=int, help="context size (default: the model's, at most 4096)")
    ap.add_argument("--verbose", action="store_true", help="let llama.cpp log its own loading details")
    ap.add_argument("--fd", type=int, help="a socket already bound to the port (passed by rbee-hive)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rbee-worker`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        force=True,  # a worker forked from rbee-hive serve inherits its logging set-up
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    logging.Formatter.converter = time.gmtime
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
