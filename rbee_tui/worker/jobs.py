"""The worker's state: one loaded engine, its status, and the queue of jobs that one task runs in order.

Requests queue in arrival order and run one at a time in a single generation thread; each starts from a
clean KV cache.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from rbee_tui.errors import RbeeError
from rbee_tui.worker.chat import ChatTemplate
from rbee_tui.worker.engines import GenerationSummary, LlamaCppEngine, Request, llama_cpp_version
from rbee_tui.worker.requests import BadRequest

log = logging.getLogger("rbee-worker")
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
        self.chat: ChatTemplate | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def load(self) -> None:
        """Load the model in a thread; the status says how that went."""
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(self.engine.load)
        except RbeeError as exc:
            self.load_error = exc.message
            self.status = "failed"
            return
        bos, eos = self.engine.special_tokens()
        chat = ChatTemplate(self.engine.chat_template, bos, eos)
        # Learn the template's tool-call syntax now (a few renders) rather than in the first request with tools.
        await asyncio.to_thread(lambda: chat.tool_syntax)
        self.chat = chat
        self.status = "ready"
        log.info(
            "model loaded in %.1f ms (n_ctx=%d, backend=%s)",
            (time.perf_counter() - t0) * 1000,
            self.engine.n_ctx,
            self.engine.backend,
        )

    async def run_queue(self) -> None:
        """Run queued jobs one at a time, for as long as the worker lives."""
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
            job = self.pending.popleft()
            if job.cancel.is_set():
                # Cancelled while queued: its caller still gets a summary, with nothing generated.
                job.summary = GenerationSummary(0, len(job.tokens), 0.0, 0.0, 0.0, 0.0, "cancelled", "")
                job.events.put_nowait(JobDone(job.summary))
                job.events.put_nowait(_DONE)
                self.jobs.pop(job.id, None)
                continue
            job.started_seq = next(self.started_counter)
            job.state = "running"
            self.running = job

            def on_token(text: str, tok: int, job: Job = job) -> None:
                loop.call_soon_threadsafe(job.events.put_nowait, TokenOut(text, tok))

            try:
                job.summary = await asyncio.to_thread(
                    self.engine.generate, job.request, on_token, job.cancel, job.tokens
                )
                job.events.put_nowait(JobDone(job.summary))
            except Exception as exc:
                log.exception("job %s failed", job.id)
                job.events.put_nowait(JobFailed(f"generation failed: {exc}"))
            finally:
                job.state = "done"
                self.running = None
                self.jobs.pop(job.id, None)
                job.events.put_nowait(_DONE)

    def submit(self, req: Request, jid: str | None = None) -> Job:
        """Queue a request; BadRequest when its id is taken or its prompt does not fit the context."""
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
        """Cancel every queued and running job."""
        for job in list(self.jobs.values()):
            job.cancel.set()

    def health(self) -> tuple[int, dict[str, Any]]:
        """The /health status code and body."""
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


WORKER = web.AppKey("worker", Worker)


@dataclass(frozen=True)
class TokenOut:
    """A token came out of the model: its text (whole UTF-8 characters) and id."""

    text: str
    id: int


@dataclass(frozen=True)
class JobDone:
    """The job ended (finished, stopped or cancelled) with its summary."""

    summary: GenerationSummary


@dataclass(frozen=True)
class JobFailed:
    """Generation failed; `message` says why."""

    message: str


JobEvent = TokenOut | JobDone | JobFailed


async def events(job: Job) -> AsyncIterator[JobEvent]:
    """A job's events as they come: tokens, then its end (done or failed)."""
    while True:
        item = await job.events.get()
        if item is _DONE:
            return
        yield item
