"""`rbee-tui gateway`: the fleet's OpenAI endpoint without the dashboard, until Ctrl-C or SIGTERM.

It connects every configured pool (or the ones named), listens, prints one line per event (where it listens,
a worker started on demand, one stopped when idle, a worker lost under a request), and on the way out stops
the workers it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from dataclasses import asdict, replace
from typing import Any

from rbee_tui import config as cfgmod
from rbee_tui.gateway.events import (
    ClusterTrouble,
    GatewayEvent,
    Listening,
    StartFailed,
    WorkerLost,
    WorkerStarted,
    WorkerStopped,
)

CONNECT_TIMEOUT_S = 30.0


def add_parser(sub: Any) -> None:
    """The `gateway` subcommand of rbee-tui."""
    p = sub.add_parser(
        "gateway",
        help="one OpenAI-compatible endpoint for the workers of every pool",
        description=(
            "Serve the OpenAI API (/v1/models, /v1/chat/completions, /v1/completions, /health, /state) for every "
            "pool: a request goes to a ready worker of its model, or starts one where it fits. Loopback by default; "
            "listening on another address needs an API key ([gateway] api_key or $RBEE_GATEWAY_API_KEY), which "
            "clients send as 'Authorization: Bearer KEY'. See docs/gateway.md."
        ),
    )
    p.add_argument("--listen", help="HOST:PORT (default: [gateway] listen, or 127.0.0.1:8080)")
    p.add_argument("--pools", help="comma-separated pool names (default: all)")
    p.add_argument("--idle-stop", type=float, help="seconds before an idle worker it started is stopped (0: never)")
    p.add_argument("--start-timeout", type=float, help="seconds a request waits for a worker started for it")
    p.add_argument("--json", action="store_true", help="one JSON object per event")


def _line(event: GatewayEvent) -> str:
    match event:
        case Listening(url=url):
            return f"🐝 gateway listening on {url} (OpenAI base URL {url}/v1)"
        case WorkerStarted(model=model, where=where, seconds=seconds):
            return f"🚀 started {model}: {where} ({seconds:.1f} s)"
        case StartFailed(model=model, reason=reason):
            return f"❌ {reason}" if reason.startswith("cannot") else f"❌ {model}: {reason}"
        case WorkerStopped(model=model, where=where, why=why):
            return f"🛑 stopped {model}: {where} ({why})"
        case WorkerLost(model=model, cause=cause, retried=retried):
            return f"⚠️  {model}: {cause}" + (" (retried elsewhere)" if retried else "")
        case ClusterTrouble(text=text):
            return f"⚠️  {text}"
    return str(event)


def _print(event: GatewayEvent, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"event": type(event).__name__, **asdict(event)}), flush=True)
    else:
        print(_line(event), flush=True)


async def serve(cfg: cfgmod.Config, args: argparse.Namespace) -> int:
    """Connect the pools, run the gateway until a signal, stop what it started; the exit status."""
    from rbee_tui.gateway.service import Gateway  # the server's imports only when it runs, not for `--help`
    from rbee_tui.pools.client import PoolClient

    gw_cfg = cfg.gateway
    if args.idle_stop is not None:
        gw_cfg = replace(gw_cfg, idle_stop=max(0.0, args.idle_stop))
    if args.start_timeout is not None:
        gw_cfg = replace(gw_cfg, start_timeout=max(1.0, args.start_timeout))
    names = [p.strip() for p in (args.pools or "").split(",") if p.strip()]
    pools = [cfg.pool(n) for n in names] if names else list(cfg.pools)
    clients: dict[str, PoolClient] = {}
    gateway = Gateway(lambda: clients, gw_cfg, listen=args.listen, notify=lambda e: _print(e, args.json))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    clients.update({p.name: PoolClient(p) for p in pools})
    try:
        for c in clients.values():
            c.start()
        await asyncio.gather(*(c.first_outcome(CONNECT_TIMEOUT_S) for c in clients.values()))
        for name, c in clients.items():
            if c.view.state != "connected":  # not fatal: it is routed to as soon as it connects
                sys.stderr.write(f"rbee-tui: warning: pool {name} is {c.view.state}: {c.view.reason}\n")
        await gateway.start()
        await stopping.wait()
        return 0
    finally:
        await gateway.close()
        await asyncio.gather(*(c.close() for c in clients.values()), return_exceptions=True)


def main(cfg: cfgmod.Config, args: argparse.Namespace) -> int:
    """Run `rbee-tui gateway`; the exit status."""
    try:
        return asyncio.run(serve(cfg, args))
    except KeyboardInterrupt:
        return 130
