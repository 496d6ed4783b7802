"""How a pool is reached: a local subprocess, or one asyncssh connection. Both run `rbee-hive ... --json`.

Every argument is quoted before it reaches a remote shell; names are validated before anything runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rbee_tui import __version__
from rbee_tui.config import PoolConfig, default_models_dir
from rbee_tui.errors import RbeeError
from rbee_tui.names import check_host, check_id, check_user

INSTALL_HINT = (
    f"install it there with `python3 -m pip install --user rbee-tui=={__version__}` (or `bash scripts/install.sh` "
    "in a checkout), or set hive_command in the pool's config to its path"
)


def hive_args(pool: PoolConfig, *args: str, json_output: bool = True) -> list[str]:
    """The arguments of an `rbee-hive` call for `pool` (after the command itself): identity, models dir, ARGS.

    `--models-dir` goes only where the pool's entry names one: an SSH node otherwise uses its own user's default
    (this machine's path would mean nothing there). The local pool's node is this machine, so its default is
    resolved here rather than by whichever config file the child would find.
    """
    check_id(pool.name, "pool name")
    models_dir = pool.models_dir or (default_models_dir() if pool.transport == "local" else None)
    argv = ["--pool-id", pool.name, *(["--models-dir", models_dir] if models_dir else []), *args]
    return [*argv, "--json"] if json_output and "--json" not in args else argv


def hive_argv(pool: PoolConfig, *args: str, json_output: bool = True) -> list[str]:
    """The argument vector of an `rbee-hive` call for `pool`, with the pool's identity and models dir."""
    return [*shlex.split(pool.hive_command), *hive_args(pool, *args, json_output=json_output)]


def _local_hive(argv: list[str]) -> list[str]:
    # Prefer the rbee-hive installed beside the running interpreter, so a venv works without activation.
    if argv and argv[0] == "rbee-hive":
        candidate = Path(sys.executable).with_name("rbee-hive")
        if candidate.exists():
            return [str(candidate), *argv[1:]]
        return [sys.executable, "-m", "rbee_tui.hive.cli", *argv[1:]]
    return argv


class Stream:
    """A running command whose stdout is read line by line, and whose stdin can be written."""

    def __init__(self, lines: AsyncIterator[str], terminate: Any, send: Any = None) -> None:
        self.lines = lines
        self._terminate = terminate
        self._send = send

    async def write(self, text: str) -> None:
        """Send `text` to the command's stdin (a stream opened with `stdin=True`)."""
        if self._send is None:
            raise RbeeError("this stream takes no input")
        await self._send(text)

    async def close(self) -> None:
        """Stop the command."""
        await self._terminate()


class LocalTransport:
    """This machine: `rbee-hive` as a child process. Tunnels are not needed: workers are on loopback here."""

    kind = "local"

    def __init__(self, pool: PoolConfig) -> None:
        self.pool = pool

    async def connect(self) -> None:
        """Nothing to open for the local pool."""

    async def wait_closed(self) -> str:
        """The local pool is never lost: wait forever."""
        await asyncio.Event().wait()
        return ""

    async def run(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        # A plain subprocess in a thread: each call reaps its own child, whatever else the loop is watching.
        try:
            done = await asyncio.to_thread(
                subprocess.run,
                _local_hive(argv),
                capture_output=True,
                timeout=timeout,
                env=os.environ.copy(),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in the terminal is ours to handle, not the node's (see stream)
            )
        except subprocess.TimeoutExpired:
            raise TimeoutError from None
        return done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")

    async def stream(self, argv: list[str], stdin: bool = False) -> Stream:
        proc = await asyncio.create_subprocess_exec(
            *_local_hive(argv),
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=os.environ.copy(),
            limit=1 << 20,
            # Its own session: Ctrl-C in the terminal reaches the whole foreground process group, and the local
            # agent must outlive it long enough for us to stop the workers we started through it.
            start_new_session=True,
        )

        async def lines() -> AsyncIterator[str]:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                yield raw.decode("utf-8", "replace")

        async def send(text: str) -> None:
            assert proc.stdin is not None
            proc.stdin.write(text.encode())
            await proc.stdin.drain()

        async def terminate() -> None:
            if proc.stdin is not None:
                proc.stdin.close()
            if proc.returncode is None:
                proc.terminate()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

        return Stream(lines(), terminate, send if stdin else None)

    async def forward(self, port: int) -> tuple[int, Any]:
        """The node is this machine: its port is reached as it is."""
        return port, None

    async def reverse(self, local_port: int) -> tuple[int, Any]:
        """The node is this machine: this machine's port is reached as it is."""
        return local_port, None

    async def close(self) -> None:
        """Nothing to close."""


class SSHTransport:
    """One asyncssh connection per pool; commands, streams and tunnels are channels on it."""

    kind = "ssh"

    def __init__(
        self, pool: PoolConfig, keepalive_interval: float = 4.0, keepalive_count_max: int = 2, max_sessions: int = 8
    ) -> None:
        self.check(pool)
        self.pool = pool
        self.keepalive_interval = keepalive_interval
        self.keepalive_count_max = keepalive_count_max
        self.conn: Any = None
        # OpenSSH allows 10 sessions per connection by default: stay under it, whatever the callers do.
        self.sessions = asyncio.Semaphore(max_sessions)
        self._session_opened = False  # whether a session ran on this connection (see forward)

    @staticmethod
    def check(pool: PoolConfig) -> None:
        """Refuse a host or user name that is not plainly one."""
        check_host(pool.host or "")
        if pool.user:
            check_user(pool.user)

    def _options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "port": self.pool.port,
            "keepalive_interval": self.keepalive_interval,
            "keepalive_count_max": self.keepalive_count_max,
            "connect_timeout": 15,
        }
        if self.pool.user:
            opts["username"] = self.pool.user
        if self.pool.identity_file:
            opts["client_keys"] = [str(Path(self.pool.identity_file).expanduser())]
        if self.pool.known_hosts:
            path = Path(self.pool.known_hosts).expanduser()
            if path.exists():
                opts["known_hosts"] = str(path)
            else:  # a file not made yet knows no host: every key is unknown, which the error then says
                import asyncssh

                opts["known_hosts"] = asyncssh.import_known_hosts("")
        return opts

    async def connect(self) -> None:
        """Open the connection, turning every failure into one line that says what to do."""
        import asyncssh

        where = f"{self.pool.host}:{self.pool.port}"
        try:
            self.conn = await asyncssh.connect(self.pool.host, **self._options())
            self._session_opened = False
        except asyncssh.HostKeyNotVerifiable:
            raise await self._host_key_error() from None
        except asyncssh.PermissionDenied:
            user = self.pool.user or "(default user)"
            raise RbeeError(
                f"{user}@{where} refused our keys",
                "check identity_file in the pool's config, or load the key into ssh-agent",
            ) from None
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            raise RbeeError(f"cannot connect to {where}: {reason}") from None

    async def _host_key_error(self) -> RbeeError:
        from rbee_tui.pools.hostkeys import describe_host_key_problem

        return await describe_host_key_problem(self.pool)

    async def wait_closed(self) -> str:
        """Return when the connection is gone (closed by the peer, or keepalives unanswered)."""
        await self.conn.wait_closed()
        return "connection closed"

    async def run(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        async with self.sessions:
            async with asyncio.timeout(timeout):
                result = await self.conn.run(shlex.join(argv), check=False)
        self._session_opened = True
        rc = result.exit_status if result.exit_status is not None else 255
        return rc, str(result.stdout or ""), str(result.stderr or "")

    async def stream(self, argv: list[str], stdin: bool = False) -> Stream:
        await self.sessions.acquire()
        try:
            proc = await self.conn.create_process(shlex.join(argv))
        except BaseException:
            self.sessions.release()
            raise
        self._session_opened = True
        released = False

        async def lines() -> AsyncIterator[str]:
            async for line in proc.stdout:
                yield line

        async def terminate() -> None:
            nonlocal released
            proc.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await proc.wait_closed()
            if not released:
                released = True
                self.sessions.release()

        async def send(text: str) -> None:
            proc.stdin.write(text)  # the channel encodes: it was opened with asyncssh's default utf-8
            await proc.stdin.drain()

        return Stream(lines(), terminate, send if stdin else None)

    async def _nodelay(self) -> None:
        if not self._session_opened:
            # sshd turns Nagle off on the connection only when a session starts: a forward on a connection that
            # never ran a command holds every small write for the peer's delayed ACK (~40 ms per round trip;
            # llama.cpp RPC decoded at 0.08x of a direct link that way, docs/cluster.md).
            await self.run(["true"], 15)

    async def forward(self, port: int) -> tuple[int, Any]:
        """A local port that reaches the node's 127.0.0.1:`port` through this connection."""
        await self._nodelay()
        listener = await self.conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", port)
        return listener.get_port(), listener

    async def reverse(self, local_port: int) -> tuple[int, Any]:
        """A port on the node's 127.0.0.1 that reaches this machine's 127.0.0.1:`local_port` through this connection
        (a remote forward: nothing listens beyond the node's loopback, and no port is opened on this machine)."""
        await self._nodelay()
        listener = await self.conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", local_port)
        return listener.get_port(), listener

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.conn.wait_closed()


def make_transport(pool: PoolConfig, **ssh_options: Any) -> LocalTransport | SSHTransport:
    """The transport a pool's config asks for."""
    return LocalTransport(pool) if pool.transport == "local" else SSHTransport(pool, **ssh_options)
