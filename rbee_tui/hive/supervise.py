"""The parent of one worker process: it records how the worker ended, which a detached worker cannot do itself.

`rbee-hive worker spawn` starts this in a new session (so it leads the worker's process group); it starts the
worker, forwards SIGTERM/SIGINT to it, waits, and writes `{"exit_code", "signal", "ended_at"}` to the exit file
atomically. Whatever the worker leaves behind in its group (llama-server, should its rbee-worker die without
stopping it) is then sent SIGTERM, so nothing of a worker outlives it. Stdlib only, so it starts fast and
stays small.

    python -m rbee_tui.hive.supervise EXIT_FILE -- COMMAND ARGS...
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    """Run the command after `--`, then record its end in the exit file."""
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: python -m rbee_tui.hive.supervise EXIT_FILE -- COMMAND [ARGS...]\n")
        return 2
    exit_file, command = argv[0], argv[2:]
    try:
        child = subprocess.Popen(command, close_fds=False)  # the worker inherits its listening socket
    except OSError as exc:
        _record(exit_file, 127, None)
        sys.stderr.write(f"rbee-hive: cannot start {command[0]}: {exc.strerror}\n")
        return 127
    rc = watch(exit_file, child.pid)
    child.returncode = rc  # reaped by watch()
    return rc


def watch(exit_file: str, pid: int) -> int:
    """Forward SIGTERM/SIGINT/SIGHUP to child `pid`, wait for it, record how it ended; return a shell status."""

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    _, status = os.waitpid(pid, 0)  # retried by Python when a forwarded signal interrupts it
    rc = os.waitstatus_to_exitcode(status)
    _record(exit_file, rc if rc >= 0 else None, -rc if rc < 0 else None)
    _end_group()
    return rc if rc >= 0 else 128 - rc


def _end_group() -> None:
    """SIGTERM what is left in the process group this supervisor leads (only if it leads one)."""
    if os.getpgrp() != os.getpid():
        return  # run from a shell or a test without a session of its own: the group is not the worker's
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpid(), signal.SIGTERM)


def _record(path: str, code: int | None, sig: int | None) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"exit_code": code, "signal": sig, "ended_at": time.time()}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
