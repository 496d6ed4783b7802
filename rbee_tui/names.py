"""Validation of the names users type: model ids, pool names, host names."""

from __future__ import annotations

import re

from rbee_tui.errors import RbeeError

# Ids end up in paths, file names and remote command lines: keep them to a safe alphabet.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# RFC 1123 host names, IPv4 and bracket-less IPv6 literals.
_HOST = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_IPV6 = re.compile(r"^[0-9A-Fa-f:]+(%[A-Za-z0-9]+)?$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_FILE = re.compile(r"^[A-Za-z0-9._+-][A-Za-z0-9._+/-]*$")
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9._-]{0,31}$")

BACKENDS = ("cpu", "cuda", "metal")


def check_id(value: str, what: str = "model id") -> str:
    """Return `value` if it is a valid id, else raise RbeeError naming what is wrong."""
    if not isinstance(value, str) or not _ID.match(value) or ".." in value:
        raise RbeeError(
            f"invalid {what} {value!r}",
            "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit; no '/', '..' or spaces",
        )
    return value


def check_host(value: str) -> str:
    """Return `value` if it is a plain host name or IP address."""
    if not isinstance(value, str) or not (_HOST.match(value) or (":" in value and _IPV6.match(value))):
        raise RbeeError(f"invalid host name {value!r}", "use a DNS name or an IP address, nothing else")
    return value


def check_user(value: str) -> str:
    """Return `value` if it is a plausible POSIX user name."""
    if not isinstance(value, str) or not _USER.match(value):
        raise RbeeError(f"invalid user name {value!r}")
    return value


def check_repo(value: str) -> str:
    """Return `value` if it looks like a Hugging Face repo id `owner/name`."""
    if not isinstance(value, str) or not _REPO.match(value) or ".." in value:
        raise RbeeError(f"invalid repository {value!r}", "expected OWNER/NAME, e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF")
    return value


def check_repo_file(value: str) -> str:
    """Return `value` if it is a relative file path inside a repo with no way out of it."""
    if (
        not isinstance(value, str)
        or not _FILE.match(value)
        or any(part in ("", ".", "..") for part in value.split("/"))
    ):
        raise RbeeError(f"invalid file name {value!r}", "expected a path inside the repository, e.g. model-q4_k_m.gguf")
    return value


def check_backends(values: list[str]) -> list[str]:
    """Return the backends list if every entry is known."""
    if not values:
        raise RbeeError("no backend given", f"choose from {', '.join(BACKENDS)}")
    for b in values:
        if b not in BACKENDS:
            raise RbeeError(f"unknown backend {b!r}", f"choose from {', '.join(BACKENDS)}")
    return list(dict.fromkeys(values))
