"""Numbers as the screens show them."""

from __future__ import annotations

from rbee_tui.units import duration as duration  # one formatter for the CLIs and the screens

GIB = 1024**3


def gib(n: float | None) -> str:
    """Bytes as GiB with one decimal, or `?` when unknown."""
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def rate(bps: float | None) -> str:
    """Bytes per second, human sized."""
    if bps is None:
        return "?"
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("KB/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.1f} {unit}"
    return f"{bps:.0f} B/s"


def level(percent: float | None, warn: float, crit: float) -> str:
    """The CSS class for a reading: '', '-warn' or '-crit'."""
    if percent is None:
        return ""
    return "-crit" if percent >= crit else "-warn" if percent >= warn else ""
