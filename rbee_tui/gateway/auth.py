"""Where the gateway listens and who may call it: loopback by default, an API key required anywhere else."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os

from rbee_tui.errors import RbeeError

KEY_ENV = "RBEE_GATEWAY_API_KEY"
KEY_HINT = f"set gateway.api_key in the config file, or {KEY_ENV}, and send it as `Authorization: Bearer KEY`"


def parse_listen(text: str) -> tuple[str, int]:
    """`host:port` (an IPv6 host in brackets) as (host, port); a clear error for anything else."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise RbeeError(f"--listen must be HOST:PORT, got {text!r}", "e.g. 127.0.0.1:8080")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def api_key(configured: str | None) -> str | None:
    """The key in force: the environment's over the config file's."""
    return os.environ.get(KEY_ENV) or configured or None


def check_exposure(host: str, key: str | None) -> None:
    """Refuse to listen beyond loopback without a key: every worker would be open to the network."""
    if not is_loopback(host) and not key:
        raise RbeeError(f"the gateway would listen on {host} without an API key", KEY_HINT)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def authorized(header: str | None, key: str) -> bool:
    """Whether an Authorization header carries the key. Digests of equal length are compared in constant time,
    so neither the key's content nor its length shows in how long a wrong guess takes."""
    scheme, _, given = (header or "").partition(" ")
    ok_scheme = scheme.lower() == "bearer"
    return hmac.compare_digest(_digest(given.strip()), _digest(key)) and ok_scheme
