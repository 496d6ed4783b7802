"""The one error type for things a user causes: a one-line message and a hint."""

from __future__ import annotations


class RbeeError(Exception):
    """A user-facing failure: printed as one line by the CLIs, shown as a notification by the dashboard."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"

    def to_json(self) -> dict[str, str]:
        """The error as the `--json` outputs carry it."""
        out = {"error": self.message}
        if self.hint:
            out["hint"] = self.hint
        return out


class CorruptFileError(RbeeError):
    """A file the tool owns could not be parsed; it is left in place untouched."""

    def __init__(self, path: str, reason: str, hint: str | None = None) -> None:
        super().__init__(f"{path} is corrupt: {reason}; it was left untouched", hint)
        self.path = path


class Cancelled(RbeeError):
    """Work stopped because the user asked for it."""

    exit_code = 130


class HostKeyUnknown(RbeeError):
    """An SSH pool presents a host key that known_hosts has nothing for: the user may check and trust it."""

    def __init__(self, pool: str, where: str, fingerprint: str, hint: str | None = None) -> None:
        super().__init__(f"the host key of {where} is unknown ({fingerprint})", hint)
        self.pool = pool  # the pool's name
        self.where = where  # host:port
        self.fingerprint = fingerprint  # SHA256:..., or "unknown" when it could not be read


class HostKeyChanged(RbeeError):
    """An SSH pool presents a host key other than the one known_hosts records for it."""

    def __init__(
        self, pool: str, where: str, fingerprint: str, expected: tuple[str, ...], known_hosts: str, hint: str | None
    ) -> None:
        super().__init__(
            f"the host key of {where} CHANGED: it presents {fingerprint}, {known_hosts} expects {', '.join(expected)}",
            hint,
        )
        self.pool = pool
        self.where = where
        self.fingerprint = fingerprint
        self.expected = expected  # the fingerprints known_hosts has for it
        self.known_hosts = known_hosts
