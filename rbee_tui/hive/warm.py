"""Warm worker start: inside `rbee-hive serve`, a CPU worker is forked from the agent instead of started afresh.

A fresh worker pays an interpreter start and the llama_cpp, numpy and aiohttp imports (~0.45 s on one core)
before it can load its model; in a test matrix that is paid for every cell. The agent imports them once, on the
first spawn it is asked for, and each later spawn forks: a supervisor (the same record-keeping as
`rbee_tui.hive.supervise`, in a new session) whose child runs the worker's own `main`.

Only for the embedded engine on the CPU backend of a build without GPU offload: a GPU runtime must never be
initialised in a process that then forks, and llama-server is its own binary anyway.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shlex
import signal
import sys

from rbee_tui.llama_build import gpu_offload

_STATE = {"tried": False, "ready": False}
_LAUNCH_ARGV = ["-m", "rbee_tui.worker.launch"]  # what a worker's command line starts with, after the interpreter


def preload() -> bool:
    """Import what a worker needs, once; True when warm starts are possible in this process."""
    if not _STATE["tried"]:
        _STATE["tried"] = True
        # numpy's BLAS would otherwise start a thread pool here, and a process with threads must not fork.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        try:
            import llama_cpp  # first: see rbee_tui.worker.launch

            import rbee_tui.worker.server  # noqa: F401

            _STATE["ready"] = not gpu_offload(llama_cpp)
        except Exception:  # a broken llama_cpp: the cold path reports it properly
            _STATE["ready"] = False
    return _STATE["ready"]


def can_fork(argv: list[str], backend: str) -> bool:
    """Whether the worker of command line `argv` can start warm in this process: the embedded engine on CPU."""
    return _STATE["ready"] and backend == "cpu" and argv[1:3] == _LAUNCH_ARGV


def fork_worker(argv: list[str], exit_file: str, log_fd: int, env: dict[str, str]) -> int:
    """Start the worker of command line `argv` warm, its output to `log_fd`; return the supervisor's pid (the
    leader of its own session). Open files are inherited as they are (its listening socket among them): the
    modules it imported hold some of their own, so none can be closed blindly."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid:
        return pid
    rc = 127
    try:
        os.setsid()
        _name(f"rbee-supervise {exit_file}")
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.environ.clear()
        os.environ.update(env)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        worker = os.fork()
        if worker == 0:
            _run_worker(argv[3:])
        from rbee_tui.hive.supervise import watch

        rc = watch(exit_file, worker)
    except BaseException:
        with contextlib.suppress(BaseException):
            sys.stderr.write("rbee-hive: the warm worker start failed\n")
    finally:
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(rc)
    return 0  # not reached


def _name(title: str) -> None:
    """What `ps` and `top` show for this process: a forked one would otherwise show the agent's command line,
    and anything that looks for the agent by it would find workers too."""
    with contextlib.suppress(Exception):
        import setproctitle

        setproctitle.setproctitle(title)


def _run_worker(args: list[str]) -> None:
    """In the forked worker: run `rbee-worker ARGS`, then leave without the interpreter's slow teardown."""
    rc = 1
    try:
        gc.enable()
        _name(shlex.join(["rbee-worker", *args]))
        sys.argv = ["rbee-worker", *args]
        sys.stdout.reconfigure(line_buffering=True)  # the log is read while the worker runs
        from rbee_tui.worker.launch import main

        rc = main(args)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            sys.stderr.write(f"rbee-worker: error: {type(exc).__name__}: {exc}\n")
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(rc)
