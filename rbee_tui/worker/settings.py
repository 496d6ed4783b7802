"""`rbee-worker`'s arguments and logging, shared by both engines (the embedded server and the llama-server
proxy)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any

from aiohttp import web

EXIT_LOAD_FAILED = 2  # the model could not be loaded (or llama-server not started)
EXIT_BIND_FAILED = 3  # the port could not be bound
EXIT_ENGINE_ENDED = 4  # llama-server died under the proxy


def fail(code: int, message: str) -> int:
    """Say why the worker ends in one line, no traceback (rbee-hive shows it as the reason); return `code`."""
    logging.getLogger("rbee_tui.worker").error("%s", message)
    sys.stderr.write(f"rbee-worker: error: {message}\n")
    sys.stderr.flush()
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
    ap.add_argument(
        "--engine",
        choices=["llama-cpp-python", "llama-server"],
        default="llama-cpp-python",
        help="llama-cpp-python in this process, or llama.cpp's llama-server behind the same API",
    )
    ap.add_argument("--llama-server", help="llama-server's path (default: $RBEE_LLAMA_SERVER, then PATH)")
    return ap


def setup_logging() -> None:
    """Log lines to stdout (the worker's log), UTC timestamps."""
    logging.basicConfig(
        force=True,  # a worker forked from rbee-hive serve inherits its logging set-up
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    logging.Formatter.converter = time.gmtime
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


async def listen(app: web.Application, args: argparse.Namespace, **runner_options: Any) -> web.AppRunner | str:
    """Serve `app` on the socket rbee-hive bound for us (--fd), or on --host/--port; the runner, or why not."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, **runner_options)
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
        return f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
    return runner


def announce(args: argparse.Namespace, version: str, engine_note: str = "") -> asyncio.Event:
    """Log where the worker listens and return the event SIGTERM/SIGINT set (the worker's way to stop)."""
    logging.getLogger("rbee_tui.worker").info(
        "rbee-worker %s listening on http://%s:%d (pid %d, model %s%s)",
        version,
        args.host,
        args.port,
        os.getpid(),
        args.model,
        engine_note,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
