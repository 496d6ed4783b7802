"""Host keys of SSH pools: why one is refused, its fingerprint, and trusting exactly the key the user was shown."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from rbee_tui import files
from rbee_tui.config import PoolConfig
from rbee_tui.errors import HostKeyChanged, HostKeyUnknown, RbeeError

CONNECT_TIMEOUT = 15.0


def known_hosts_path(pool: PoolConfig) -> Path:
    """The known_hosts file used for this pool."""
    return Path(pool.known_hosts or "~/.ssh/known_hosts").expanduser()


def host_pattern(pool: PoolConfig) -> str:
    """How OpenSSH names this host in known_hosts."""
    return pool.host if pool.port == 22 else f"[{pool.host}]:{pool.port}"  # type: ignore[return-value]


def trust_command(pool: PoolConfig) -> str:
    """The command that checks and accepts this pool's host key."""
    return f"rbee-tui trust {pool.name}"


async def server_key(pool: PoolConfig) -> Any:
    """The key the server presents (asked without trusting it); a host that cannot be reached is one clear line."""
    import asyncssh

    where = f"{pool.host}:{pool.port}"
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            key = await asyncssh.get_server_host_key(pool.host, pool.port)
    except TimeoutError:
        raise RbeeError(f"cannot connect to {where}: no answer in {CONNECT_TIMEOUT:.0f}s") from None
    except (OSError, asyncssh.Error) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        raise RbeeError(f"cannot connect to {where}: {reason}") from None
    if key is None:
        raise RbeeError(f"{where} presented no host key")
    return key


def fingerprint(key: Any) -> str:
    """A key's SHA256 fingerprint as OpenSSH prints it (`SHA256:...`)."""
    return str(key.get_fingerprint("sha256"))


def _known_keys(pool: PoolConfig) -> list[Any]:
    import asyncssh

    path = known_hosts_path(pool)
    if not path.exists():
        return []
    known = asyncssh.read_known_hosts(str(path))
    trusted, _, _, _, _, _, _ = known.match(pool.host, "", pool.port)
    return list(trusted)


async def describe_host_key_problem(pool: PoolConfig) -> HostKeyUnknown | HostKeyChanged:
    """The typed error for an unknown or changed host key, with the fingerprint and what to do."""
    try:
        presented = fingerprint(await server_key(pool))
    except Exception:  # the first failure already says enough; the fingerprint is a bonus
        presented = "unknown"
    where = f"{pool.host}:{pool.port}"
    known = _known_keys(pool)
    path = known_hosts_path(pool)
    if known:
        return HostKeyChanged(
            pool.name,
            where,
            presented,
            tuple(fingerprint(k) for k in known),
            str(path),
            f"if the machine was reinstalled, remove the old key with: ssh-keygen -R '{host_pattern(pool)}' -f {path}",
        )
    return HostKeyUnknown(pool.name, where, presented, f"check it, then accept it with: {trust_command(pool)}")


def _refuse_if_known(pool: PoolConfig) -> None:
    if _known_keys(pool):
        raise RbeeError(
            f"{known_hosts_path(pool)} already has a key for {host_pattern(pool)}",
            f"remove it first with: ssh-keygen -R '{host_pattern(pool)}' -f {known_hosts_path(pool)}",
        )


def write_key(pool: PoolConfig, key: Any) -> str:
    """Record `key` (the very key object the user was shown) for the pool in its known_hosts; return its fingerprint.

    Nothing recorded for the host may be there yet: a changed key is the user's to remove, by hand.
    """
    path = known_hosts_path(pool)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    algorithm, blob = key.export_public_key("openssh").decode().split()[:2]
    with files.locked(path):
        _refuse_if_known(pool)  # checked under the lock: two trusts at once must not write two lines
        old = path.read_text() if path.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        files.atomic_write(path, f"{old}{host_pattern(pool)} {algorithm} {blob}\n", mode=0o600)
    return fingerprint(key)


async def trust(pool: PoolConfig, shown: str) -> str:
    """Trust the pool's host key if it is the one the user was shown (`shown`, `SHA256:...`); return it.

    It connects again and refuses when the key presented now is another: someone between the two connections
    must not get trusted in the machine's place.
    """
    _refuse_if_known(pool)
    key = await server_key(pool)
    now = fingerprint(key)
    if now != shown:
        raise RbeeError(
            f"{pool.host}:{pool.port} now presents {now}, you were shown {shown}: not trusted",
            "someone may be between you and the machine: compare with `ssh-keygen -lf "
            "/etc/ssh/ssh_host_ed25519_key.pub` run on the machine itself",
        )
    return write_key(pool, key)
