"""llama.cpp's llama-server as the child of a llama-server worker: started on a private port, watched, stopped.

The worker (proxy.py) is what clients talk to; llama-server listens on a loopback port of its own and only the
worker calls it. Its output goes to the worker's log as it comes, and its last lines say why it ended. It
never outlives the worker: the worker stops it on the way out, and on Linux the kernel kills it should the
worker die without a chance to (SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp

from rbee_tui.errors import RbeeError
from rbee_tui.llama_build import cached

STOP_GRACE_S = 8.0  # below rbee-hive's 10 s before it kills the whole process group
_PR_SET_PDEATHSIG = 1
_LOG_PREFIX = re.compile(r"^[\d.]+ [A-Z] +")  # llama.cpp's "0.00.005.696 E " before each line
_ERROR_LINE = re.compile(r"^[\d.]+ E ")


def _die_with_parent() -> None:
    """In the child, before exec: ask the kernel for SIGKILL when the worker (its parent) dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    """A loopback port nothing listens on now (llama-server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ended(returncode: int) -> str:
    """How a process ended, in words."""
    return f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"


class LlamaServer:
    """One llama-server process serving one model on 127.0.0.1:`port`."""

    def __init__(self, binary: str, model: str, n_ctx: int, backend: str, gpu: int) -> None:
        self.binary = binary
        self.model = model
        self.n_ctx = n_ctx
        self.backend = backend
        self.gpu = gpu
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.tail: deque[str] = deque(maxlen=200)
        self._relay: asyncio.Task[None] | None = None

    def argv(self) -> list[str]:
        """llama-server's command line: one slot (the worker queues requests), loopback only."""
        # A cluster coordinator's own arguments (--rpc, --tensor-split, -ngl, -c ...), set by rbee-hive's spawn:
        # they replace ours (llama-server warns about a flag given twice).
        extra = shlex.split(os.environ.get("RBEE_LLAMA_SERVER_ARGS", ""))
        argv = [self.binary, "-m", self.model, "--host", "127.0.0.1", "--port", str(self.port), "--parallel", "1"]
        if "-c" not in extra and "--ctx-size" not in extra:
            argv += ["-c", str(self.n_ctx)]
        if "-ngl" not in extra and "--n-gpu-layers" not in extra:
            argv += ["-ngl", "0" if self.backend == "cpu" else "999"]
        if self.backend == "cuda":
            argv += ["--main-gpu", str(self.gpu), "--split-mode", "none"]
        return argv + extra

    async def start(self) -> None:
        """Start llama-server; its output is relayed to ours line by line."""
        kwargs: dict[str, Any] = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs
        )
        self._relay = asyncio.create_task(self._relay_output())

    async def _relay_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        out = sys.stdout.buffer
        async for line in self.proc.stdout:
            out.write(line)
            out.flush()
            self.tail.append(line.decode("utf-8", "replace").rstrip())

    @property
    def pid(self) -> int | None:
        """llama-server's process id."""
        return self.proc.pid if self.proc is not None else None

    async def wait(self) -> int:
        """Wait for llama-server to end (its output read to the end); its return code."""
        assert self.proc is not None
        rc = await self.proc.wait()
        if self._relay is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._relay), 2.0)
        return rc

    def reason(self) -> str:
        """The line of llama-server's last output that best says why it stopped."""
        last = [line for line in self.tail if line.strip()][-20:]
        clean = [_LOG_PREFIX.sub("", line).strip() for line in last]
        for line in clean:
            if "error loading model:" in line:
                return line.split("error loading model:", 1)[1].strip()
        # The first error of the end is the cause; the ones after it say what failed because of it.
        errors = [c for line, c in zip(last, clean, strict=True) if _ERROR_LINE.match(line)]
        return errors[0] if errors else clean[-1] if clean else "no output"

    async def ready(self, session: aiohttp.ClientSession, interval: float = 0.02) -> dict[str, Any]:
        """Wait until llama-server has loaded its model; its /props. RuntimeError if it ends first."""
        assert self.proc is not None
        while True:
            if self.proc.returncode is not None:
                rc = await self.wait()
                raise RuntimeError(f"llama-server ended ({ended(rc)}): {self.reason()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        async with session.get(f"{self.url}/props") as props:
                            props.raise_for_status()
                            answer = await props.json()
                            return answer if isinstance(answer, dict) else {}
            await asyncio.sleep(interval)

    async def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; its return code (None if it never started)."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
        return await self.wait()


def find_llama_server(explicit: str | None = None) -> str:
    """The llama-server binary: --llama-server / the pool's key, $RBEE_LLAMA_SERVER, PATH, else the node's
    build (rbee-hive setup, scripts/build-llama-cpp.sh)."""
    for candidate in (explicit, os.environ.get("RBEE_LLAMA_SERVER"), shutil.which("llama-server")):
        if candidate:
            path = Path(candidate).expanduser()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
            raise RbeeError(f"llama-server not found at {path}")
    found = cached(("llama-server",))
    if found:
        return found
    raise RbeeError(
        "llama-server is not installed on this node",
        "build it with scripts/build-llama-cpp.sh (or rbee-hive setup), or set llama_server in the pool's config",
    )
