"""Quantities as people read them, the same in every CLI and screen."""

from __future__ import annotations


def duration(seconds: float | None) -> str:
    """Seconds as `1h02m`, `3m05s`, `12s`; `?` when unknown."""
    if seconds is None:
        return "?"
    s = max(0, int(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
