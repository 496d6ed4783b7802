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
