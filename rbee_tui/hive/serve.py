"""`rbee-hive serve`: one long-lived agent per connection, answering JSON requests on stdin.

A fresh `rbee-hive` per command costs an interpreter start and its imports (about 0.3 s) on every call. The
agent pays that once: each request runs the very same command line in a child forked from this warm process,
so a call costs a fork and a round trip, and a command that crashes or hangs takes only its own child down.

Requests, one JSON object per line:  {"id": 1, "argv": ["--pool-id", "local", "models", "catalog", "--json"]}
                                     {"id": 1, "signal": "TERM"}   (ends request 1's command)
Answers, one per request, in completion order:  {"id": 1, "rc": 0, "out": "...", "err": "..."}
The first line out is a greeting: {"serve": 1, "agent_version": "...", "protocol": 1}. End of stdin ends it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import itertools
import json
import os
import selectors
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

SERVE_PROTOCOL = 1
_SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "KILL": signal.SIGKILL}
# How a request's argv runs: `rbee-hive`'s own main, handed in by the caller so that this module imports no
# command (rbee_tui.hive.cli imports this one to start it).
Command = Callable[[list[str], argparse.ArgumentParser], int]


@dataclass
class _Job:
    id: object
    pid: int
    fds: dict[int, bytearray] = field(default_factory=dict)  # out and err pipes, still open
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    rc: int | None = None


def _preload() -> None:
    # What the short commands import, loaded once here so that every forked child starts warm (the parser,
    # which argparse takes ~20 ms to build, comes built from the caller). huggingface_hub and NVML stay out:
    # downloads and metrics run as their own streams, and the idle agent should stay small.
    import logging  # noqa: F401

    import psutil  # noqa: F401

    from rbee_tui.hive import downloads, status, verify, workers  # noqa: F401


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _child(argv: list[str], out_w: int, err_w: int, parser: argparse.ArgumentParser, command: Command) -> None:
    """In the forked child: become a plain `rbee-hive ARGV` whose stdout and stderr are the two pipes."""
    rc = 1
    try:
        gc.disable()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the command must never read the agent's requests
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        for fd in {out_w, err_w} - {0, 1, 2}:  # only as stdout and stderr: a worker it starts must not hold them
            os.close(fd)
        try:
            rc = command(argv, parser)
        except SystemExit as exc:  # argparse's usage errors
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BaseException as exc:  # a crash is this request's answer, never the agent's end
        with contextlib.suppress(BaseException):
            sys.stderr.write(f"rbee-hive: error: {type(exc).__name__}: {exc}\n")
        rc = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(rc)


def _is_spawn(argv: list[str]) -> bool:
    return ("worker", "spawn") in itertools.pairwise(argv)


def _problem(req: object) -> str:
    """What is wrong with a parsed request, or "" when nothing is."""
    if not isinstance(req, dict) or "id" not in req:
        return "a request is an object with an id"
    if "signal" in req:
        return ""  # never answered: the answer with this id is the command's own
    argv = req.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        return "argv must be a list of strings"
    return ""


class Server:
    """The loop: requests on stdin, one forked child per request, answers on stdout."""

    def __init__(self, parser: argparse.ArgumentParser, command: Command) -> None:
        self.parser = parser
        self.command = command
        self.sel = selectors.DefaultSelector()
        self.jobs: dict[int, _Job] = {}  # pid -> job
        self.pipes: dict[int, _Job] = {}  # pipe fd -> job
        self.pending = b""
        self.eof = False
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)

    def answer(self, obj: dict[str, object]) -> None:
        _write_all(1, (json.dumps(obj, ensure_ascii=False) + "\n").encode())

    def start(self, request_id: object, argv: list[str]) -> None:
        if _is_spawn(argv):
            from rbee_tui.hive import warm

            warm.preload()  # once: this and every later worker is forked warm (rbee_tui.hive.warm)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            for fd in (out_r, err_r, self.wake_r, self.wake_w):
                os.close(fd)
            _child(argv, out_w, err_w, self.parser, self.command)
        os.close(out_w)
        os.close(err_w)
        job = _Job(request_id, pid)
        for fd, buf in ((out_r, job.out), (err_r, job.err)):
            os.set_blocking(fd, False)
            job.fds[fd] = buf
            self.pipes[fd] = job
            self.sel.register(fd, selectors.EVENT_READ)
        self.jobs[pid] = job

    def request(self, line: bytes) -> None:
        try:
            req = json.loads(line)
        except ValueError as exc:
            req, problem = None, str(exc)
        else:
            problem = _problem(req)
        if problem:
            rid = req.get("id") if isinstance(req, dict) else None
            self.answer({"id": rid, "rc": 2, "out": "", "err": f"rbee-hive: error: bad request: {problem}\n"})
        elif "signal" in req:
            job = next((j for j in self.jobs.values() if j.id == req["id"]), None)
            if job is not None and req["signal"] in _SIGNALS:
                os.kill(job.pid, _SIGNALS[req["signal"]])
        else:
            self.start(req["id"], req["argv"])

    def read_stdin(self) -> None:
        data = os.read(0, 1 << 16)
        if not data:
            self.eof = True
            self.sel.unregister(0)
            return
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            if line.strip():
                self.request(line)

    def read_pipe(self, fd: int, drain: bool = False) -> None:
        job = self.pipes[fd]
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            if not data:
                self._close_pipe(fd)
                return
            job.fds[fd].extend(data)
            if not drain:
                return

    def _close_pipe(self, fd: int) -> None:
        job = self.pipes.pop(fd)
        job.fds.pop(fd, None)
        self.sel.unregister(fd)
        os.close(fd)

    def reap(self) -> None:
        while self.jobs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.jobs.pop(pid, None)
            if job is None:
                continue
            job.rc = os.waitstatus_to_exitcode(status)
            if job.rc < 0:
                job.rc = 128 - job.rc  # killed by a signal: the shell's convention
            # Everything the child wrote is in the pipes now; a grandchild that kept them open must not hold the
            # answer back, so read what is there and close them.
            for fd in list(job.fds):
                self.read_pipe(fd, drain=True)
                if fd in self.pipes:
                    self._close_pipe(fd)
            self.answer(
                {
                    "id": job.id,
                    "rc": job.rc,
                    "out": job.out.decode("utf-8", "replace"),
                    "err": job.err.decode("utf-8", "replace"),
                }
            )

    def run(self) -> int:
        from rbee_tui import PROTOCOL, __version__

        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)  # a child's exit wakes the select below
        self.sel.register(0, selectors.EVENT_READ)
        self.sel.register(self.wake_r, selectors.EVENT_READ)
        self.answer({"serve": SERVE_PROTOCOL, "agent_version": __version__, "protocol": PROTOCOL})
        while not (self.eof and not self.jobs):
            # The timeout only matters if a wake-up byte were ever lost; it never busy-waits.
            for key, _ in self.sel.select(timeout=1.0 if self.jobs else None):
                fd = key.fd
                if fd == 0:
                    self.read_stdin()
                elif fd == self.wake_r:
                    try:
                        while os.read(self.wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                elif fd in self.pipes:
                    self.read_pipe(fd)
            self.reap()
        return 0


def serve(parser: argparse.ArgumentParser, command: Command) -> int:
    """Run the agent until stdin ends, each request through `command` with `parser`; return the exit status."""
    if not hasattr(os, "fork"):
        sys.stderr.write("rbee-hive: error: serve needs a POSIX system (fork)\n")
        return 2
    _preload()
    # Children are short-lived: keep the collector off the warm heap so that forking copies as few pages as can be.
    gc.freeze()
    try:
        return Server(parser, command).run()
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # the dashboard went away while we answered
            return 0
        raise
    except KeyboardInterrupt:
        return 130
