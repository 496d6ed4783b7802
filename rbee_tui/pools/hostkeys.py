"""Host keys of SSH pools: why one is refused, its fingerprint, and trusting it on the user's word."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rbee_tui import files
from rbee_tui.config import PoolConfig
from rbee_tui.errors import RbeeError


def known_hosts_path(pool: PoolConfig) -> Path:
    """The known_hosts file used for this pool."""
    return Path(pool.known_hosts or "~/.ssh/known_hosts").expanduser()


def host_pattern(pool: PoolConfig) -> str:
    """How OpenSSH names this host in known_hosts."""
    return pool.host if pool.port == 22 else f"[{pool.host}]:{pool.port}"  # type: ignore[return-value]


async def server_key(pool: PoolConfig) -> Any:
    """The key the server presents (asked without trusting it)."""
    import asyncssh

    key = await asyncssh.get_server_host_key(pool.host, pool.port)
    if key is None:
        raise RbeeError(f"{pool.host}:{pool.port} presented no host key")
    return key


def _known_keys(pool: PoolConfig) -> list[Any]:
    import asyncssh

    path = known_hosts_path(pool)
    if not path.exists():
        return []
    known = asyncssh.read_known_hosts(str(path))
    trusted, _, _, _, _, _, _ = known.match(pool.host, "", pool.port)
    return list(trusted)


async def describe_host_key_problem(pool: PoolConfig) -> RbeeError:
    """A one-line error for an unknown or changed host key, with the fingerprint and what to do."""
    try:
        key = await server_key(pool)
        fingerprint = key.get_fingerprint("sha256")
    except Exception:  # the first failure already says enough; the fingerprint is a bonus
        fingerprint = "unknown"
    where = f"{pool.host}:{pool.port}"
    known = _known_keys(pool)
    if known:
        old = ", ".join(k.get_fingerprint("sha256") for k in known)
        return RbeeError(
            f"the host key of {where} CHANGED: it presents {fingerprint}, {known_hosts_path(pool)} expects {old}",
            f"if the machine was reinstalled, remove the old key with: ssh-keygen -R '{host_pattern(pool)}' "
            f"-f {known_hosts_path(pool)}",
        )
    return RbeeError(
        f"the host key of {where} is unknown ({fingerprint})",
        f"check it, then accept it with: rbee-tui pool {pool.name} trust",
    )


async def trust(pool: PoolConfig) -> str:
    """Add the server's current key to known_hosts (when nothing is recorded for it yet); return its fingerprint."""
    if _known_keys(pool):
        raise RbeeError(
            f"{known_hosts_path(pool)} already has a key for {host_pattern(pool)}",
            f"remove it first with: ssh-keygen -R '{host_pattern(pool)}'",
        )
    key = await server_key(pool)
    line = (
        f"{host_pattern(pool)} {key.export_public_key('openssh').decode().split(' ')[0]} "
        f"{key.export_public_key('openssh').decode().split(' ')[1].strip()}\n"
    )
    path = known_hosts_path(pool)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with files.locked(path):
        old = path.read_text() if path.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        files.atomic_write(path, old + line, mode=0o600)
    return key.get_fingerprint("sha256")
