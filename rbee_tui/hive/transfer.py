"""One file's transfer from the hub, resumed across runs, with throttled progress and cancel.

The transfer is ours rather than huggingface_hub's, because recent huggingface_hub versions delete their
partial file when a process dies, and a 14 GB model must not start over from zero. The bytes received so far
stay in `<model dir>/.partial/<file>.part`, beside a small JSON note of the etag they belong to, and the next
run asks only for the rest with a Range request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rbee_tui import files
from rbee_tui.errors import Cancelled
from rbee_tui.hive.hashing import Sink
from rbee_tui.hive.hub import RemoteFile, network_error, status_error

PROGRESS_EVERY_S = 0.25
RETRIES = 5


@dataclass(frozen=True)
class Progress:
    """One progress report of a download (all files of a model together)."""

    model: str
    file: str
    bytes_done: int
    bytes_total: int
    speed_bps: float
    eta_s: float | None
    resumed_from: int

    def to_json(self) -> dict[str, Any]:
        """The `--json` progress event."""
        return {"event": "progress", **asdict(self)}


class Meter:
    """Turns byte counts into throttled progress events."""

    def __init__(self, model: str, total: int, resumed: int, emit: Callable[[Progress], None]) -> None:
        self.model, self.total, self.resumed, self.emit = model, total, resumed, emit
        self.done = resumed
        self.started = time.monotonic()
        self.last = 0.0

    def add(self, n: int, file: str, force: bool = False) -> None:
        """Count `n` more bytes of `file`; report at most every PROGRESS_EVERY_S unless `force`."""
        self.done += n
        now = time.monotonic()
        if not force and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-6)
        speed = (self.done - self.resumed) / elapsed
        eta = (self.total - self.done) / speed if speed > 0 and self.total else None
        self.emit(
            Progress(
                self.model,
                file,
                self.done,
                self.total,
                round(speed, 1),
                None if eta is None else round(eta, 2),
                self.resumed,
            )
        )


class Partial:
    """The bytes of one file received so far, and the etag they belong to."""

    def __init__(self, directory: Path, remote: RemoteFile) -> None:
        safe = remote.name.replace("/", "__")
        self.path = directory / ".partial" / f"{safe}.part"
        self.note = self.path.with_name(self.path.name + ".json")
        self.remote = remote

    def size(self) -> int:
        """Bytes kept from an earlier attempt at this same file (0 if none or if the file changed)."""
        try:
            note = json.loads(self.note.read_text())
        except (OSError, ValueError):
            note = None
        if not note or note.get("etag") != self.remote.etag or note.get("size") != self.remote.size:
            self.discard()
            return 0
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        if self.remote.size is not None and size > self.remote.size:
            self.discard()
            return 0
        return size

    def start(self) -> None:
        """Write the note that says which file these bytes belong to."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write_json(self.note, {"etag": self.remote.etag, "size": self.remote.size, "url": self.remote.url})

    def discard(self) -> None:
        """Forget the bytes and their note."""
        for p in (self.path, self.note):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def fetch(partial: Partial, meter: Meter, cancel: threading.Event, hub: str, repo: str) -> str:
    """Bring `partial` to its full size, resuming with Range requests; return the sha256 of the whole file."""
    import httpx2
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers

    remote = partial.remote
    have = partial.size()
    partial.start()
    digest = hashlib.sha256()
    if have:
        with open(partial.path, "rb") as fh:
            while block := fh.read(4 << 20):
                digest.update(block)
    session = get_session()
    attempt = 0
    while remote.size is None or have < remote.size:
        headers = build_hf_headers()
        headers["Accept-Encoding"] = "identity"
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with session.stream("GET", remote.url, headers=headers, follow_redirects=True, timeout=30) as resp:
                if resp.status_code in (429,) or resp.status_code >= 500:
                    raise httpx2.RemoteProtocolError(f"server answered {resp.status_code}")
                if resp.status_code >= 400:
                    raise status_error(resp.status_code, repo, remote.name, hub)
                if have and resp.status_code != 206:
                    # The server ignored the Range header: start this file again from zero.
                    partial.discard()
                    partial.start()
                    meter.done -= have
                    have, digest = 0, hashlib.sha256()
                with open(partial.path, "ab") as fh:
                    sink = Sink(fh, digest)
                    pending = bytearray()
                    try:
                        for block in resp.iter_bytes():
                            if cancel.is_set():
                                raise Cancelled(f"download of {meter.model} cancelled; {have} bytes kept for resume")
                            pending += block
                            have += len(block)
                            attempt = 0
                            meter.add(len(block), remote.name)
                            if len(pending) >= Sink.BLOCK:
                                sink.put(bytes(pending))
                                pending.clear()
                    finally:
                        # What arrived is kept, however the transfer ended: a resume starts right after it.
                        try:
                            sink.put(bytes(pending))
                        finally:
                            sink.close()
                if remote.size is None:
                    break
                if have < remote.size:
                    raise httpx2.RemoteProtocolError(f"connection closed at byte {have} of {remote.size}")
        except (httpx2.TransportError, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
                raise
            attempt += 1
            if attempt > RETRIES:
                raise network_error(hub, exc) from None
            if cancel.wait(min(0.25 * 2**attempt, 4.0)):
                raise Cancelled(f"download of {meter.model} cancelled; {have} bytes kept for resume") from None
    return digest.hexdigest()
