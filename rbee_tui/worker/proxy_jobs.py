"""The queue of a llama-server worker: requests in arrival order, as many running at once as llama-server has
slots (one unless the worker was spawned with `--parallel N`, which batches N requests continuously).

llama-server would queue requests beyond its slots itself; queueing them here instead lets the worker answer
/health (`busy`, `queue`) and /cancel (a queued request leaves at once, a running one is stopped) as the
embedded worker does, with the same arrival and start numbers in `/execute` summaries.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field

from rbee_tui.worker.requests import BadRequest


@dataclass(eq=False)
class Job:
    """One request, from its arrival to its answer."""

    id: str
    arrival_seq: int
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    state: str = "queued"
    started_seq: int = 0


class Queue:
    """Requests in arrival order, `slots` running at a time: what /health counts and /cancel finds."""

    def __init__(self, slots: int = 1) -> None:
        self.slots = slots  # llama-server's own slots: that many requests run at once (continuous batching)
        self.jobs: dict[str, Job] = {}
        self.waiting: deque[tuple[Job, asyncio.Future[bool]]] = deque()
        self.active: list[Job] = []
        self._arrival = itertools.count(1)
        self._started = itertools.count(1)

    @property
    def running(self) -> Job | None:
        """The job started last of those running."""
        return self.active[-1] if self.active else None

    def __len__(self) -> int:
        return len(self.waiting) + len(self.active)

    def add(self, jid: str) -> Job:
        """A new job; BadRequest when its id is taken."""
        if jid in self.jobs:
            raise BadRequest(f"job_id {jid!r} is already queued or running")
        job = Job(jid, next(self._arrival))
        self.jobs[jid] = job
        return job

    def _start(self, job: Job) -> None:
        job.state, job.started_seq = "running", next(self._started)
        self.active.append(job)

    async def turn(self, job: Job) -> bool:
        """Wait for `job`'s turn: True when it runs, False when it was cancelled while it waited."""
        if len(self.active) < self.slots and not self.waiting:
            self._start(job)
            return True
        turn: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiting.append((job, turn))
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.result():
                self.done(job)  # its turn came as its client left: pass it on
            self._drop(job)
            raise

    def _drop(self, job: Job) -> None:
        self.waiting = deque((j, f) for j, f in self.waiting if j is not job)

    def cancel(self, job: Job) -> None:
        """Stop a job: a waiting one leaves the queue at once, a running one is told to stop."""
        job.cancel.set()
        for waiting, turn in self.waiting:
            if waiting is job and not turn.done():
                turn.set_result(False)
        self._drop(job)

    def done(self, job: Job) -> None:
        """A job has ended: the next one runs."""
        job.state = "done"
        self.jobs.pop(job.id, None)
        if job in self.active:
            self.active.remove(job)
            while self.waiting and len(self.active) < self.slots:
                nxt, turn = self.waiting.popleft()
                if not turn.done():
                    self._start(nxt)
                    turn.set_result(True)

    def cancel_all(self) -> None:
        """Stop every job."""
        for job in list(self.jobs.values()):
            self.cancel(job)
