"""Hugging Face downloads with progress, cancel, and resume across runs.

huggingface_hub resolves the file (HF_ENDPOINT, HF_TOKEN, redirects, size and sha256 from its metadata
call) and provides the HTTP session; the transfer itself is ours, because recent huggingface_hub versions
delete their partial file when a process dies, and a 14 GB model must not start over from zero. The bytes
received so far stay in `<model dir>/.partial/<file>.part`, beside a small JSON note of the etag they
belong to, and the next run asks only for the rest with a Range request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rbee_tui import files
from rbee_tui.catalog import CatalogStore, ModelEntry, ensure_not_tiny, model_dir
from rbee_tui.errors import Cancelled, RbeeError
from rbee_tui.hive.verify import check_file, check_gguf_structure, looks_like_sha256, split_files
from rbee_tui.tinymodel import TINY_TEST_ID

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


@dataclass(frozen=True)
class RemoteFile:
    """What the hub says about one file."""

    name: str
    url: str
    size: int | None
    etag: str | None
    commit: str | None


def endpoint(default: str) -> str:
    """The hub endpoint: HF_ENDPOINT when set (huggingface_hub's own rule), else the config's registry."""
    return (os.environ.get("HF_ENDPOINT") or default).rstrip("/")


def _offline_check() -> None:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise RbeeError("HF_HUB_OFFLINE is set: downloads are disabled", "unset HF_HUB_OFFLINE to download")


def _network_error(hub: str, exc: BaseException) -> RbeeError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return RbeeError(f"cannot reach the model hub at {hub}: {reason}", "check the network, or set HF_ENDPOINT")


def _status_error(status: int, repo: str, file: str, hub: str) -> RbeeError:
    if status in (401, 403):
        return RbeeError(f"access to {repo} was refused ({status})", "for a gated model, set HF_TOKEN")
    if status == 404:
        return RbeeError(f"{file} was not found in {repo} on {hub} (404)", "check --repo and --file")
    return RbeeError(f"the hub answered {status} for {repo}/{file}")


def resolve(repo: str, file: str, hub: str) -> RemoteFile:
    """Ask the hub for a file's size, etag (sha256 for LFS files) and download location."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    url = hf_hub_url(repo, file, endpoint=hub)
    for attempt in range(3):
        try:
            meta = get_hf_file_metadata(url, endpoint=hub, retry_on_errors=False)
            break
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status in (429, 500, 502, 503, 504) and attempt < 2:
                time.sleep(1 + attempt)
                continue
            raise _status_error(status, repo, file, hub) from None
        except httpx2.ConnectError as exc:
            # Refused or unresolvable: retrying only delays the one line the user needs.
            raise _network_error(hub, exc) from None
        except (httpx2.TransportError, OSError) as exc:
            if attempt < 2:
                time.sleep(1 + attempt)
                continue
            raise _network_error(hub, exc) from None
    return RemoteFile(name=file, url=meta.location or url, size=meta.size, etag=meta.etag, commit=meta.commit_hash)


class _Meter:
    """Turns byte counts into throttled progress events."""

    def __init__(self, model: str, total: int, resumed: int, emit: Callable[[Progress], None]) -> None:
        self.model, self.total, self.resumed, self.emit = model, total, resumed, emit
        self.done = resumed
        self.started = time.monotonic()
        self.last = 0.0

    def add(self, n: int, file: str, force: bool = False) -> None:
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


class _Partial:
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write_json(self.note, {"etag": self.remote.etag, "size": self.remote.size, "url": self.remote.url})

    def discard(self) -> None:
        for p in (self.path, self.note):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class _Sink:
    """Writes and hashes a download's bytes on a thread of its own, so the transfer never waits for the disk or
    for sha256 (together ~1 s per 800 MB here, ~20% of a local transfer when done in line)."""

    BLOCK = 1 << 20  # bytes handed over at a time
    SYNC_EVERY = 64 << 20  # written back as it goes, so the final fsync has little left to do

    def __init__(self, fh: Any, digest: Any) -> None:
        self.fh = fh
        self.digest = digest
        self.error: OSError | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=32)
        self._thread = threading.Thread(target=self._run, name="download-sink", daemon=True)
        self._thread.start()

    def put(self, block: bytes) -> None:
        """Queue `block` to be written after the ones before it."""
        if self.error is not None:
            raise self.error
        if block:
            self._queue.put(block)

    def _run(self) -> None:
        unsynced = 0
        while (block := self._queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the writer stops at the first error, which close() raises
            try:
                self.fh.write(block)
                self.digest.update(block)
                unsynced += len(block)
                if unsynced >= self.SYNC_EVERY:
                    self.fh.flush()
                    _datasync(self.fh.fileno())
                    unsynced = 0
            except OSError as exc:
                self.error = exc

    def close(self) -> None:
        """Write what is queued, then make it durable; raise the first write error."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error
        self.fh.flush()
        os.fsync(self.fh.fileno())


def _fetch(partial: _Partial, meter: _Meter, cancel: threading.Event, hub: str, repo: str) -> str:
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
                    raise _status_error(resp.status_code, repo, remote.name, hub)
                if have and resp.status_code != 206:
                    # The server ignored the Range header: start this file again from zero.
                    partial.discard()
                    partial.start()
                    meter.done -= have
                    have, digest = 0, hashlib.sha256()
                with open(partial.path, "ab") as fh:
                    sink = _Sink(fh, digest)
                    pending = bytearray()
                    try:
                        for block in resp.iter_bytes():
                            if cancel.is_set():
                                raise Cancelled(f"download of {meter.model} cancelled; {have} bytes kept for resume")
                            pending += block
                            have += len(block)
                            attempt = 0
                            meter.add(len(block), remote.name)
                            if len(pending) >= _Sink.BLOCK:
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
                raise _network_error(hub, exc) from None
            if cancel.wait(min(0.25 * 2**attempt, 4.0)):
                raise Cancelled(f"download of {meter.model} cancelled; {have} bytes kept for resume") from None
    return digest.hexdigest()


def download(
    store: CatalogStore,
    model_id: str,
    hub: str,
    on_progress: Callable[[Progress], None] = lambda p: None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Download every file of `model_id`, verify it, and only then mark it downloaded. Returns the result."""
    cancel = cancel or threading.Event()
    entry = store.load().get(model_id)
    if model_id == TINY_TEST_ID:
        return _regenerate_tiny(store, entry)
    if entry.downloaded and _on_disk(entry):
        return {
            "event": "done",
            "model": model_id,
            "already_downloaded": True,
            "path": entry.path,
            "size_bytes": entry.size_bytes,
            "bytes_transferred": 0,
            "resumed_from": 0,
        }
    if not entry.repo:
        raise RbeeError(f"model {model_id} has no repository to download from", "register it with --repo")
    _offline_check()
    directory = model_dir(store.models_dir, model_id)
    with files.try_locked(directory / ".download", f"a download of {model_id} is already running"):
        names = split_files(entry.file)
        remotes = [resolve(entry.repo, name, hub) for name in names]
        partials = [_Partial(directory, r) for r in remotes]
        resumed = sum(p.size() for p in partials)
        total = sum(r.size or 0 for r in remotes)
        meter = _Meter(model_id, total, resumed, on_progress)
        started = time.monotonic()
        meter.add(0, names[0], force=True)
        digests = []
        facts: dict[str, Any] = {}
        for partial in partials:
            digest = _fetch(partial, meter, cancel, hub, entry.repo)
            try:
                read = check_gguf_structure(partial.path)
                facts = facts or read  # the first file's header describes the model
                if partial.remote.size is not None and partial.path.stat().st_size != partial.remote.size:
                    raise RbeeError(f"{partial.remote.name}: size differs from the hub's {partial.remote.size}")
                if looks_like_sha256(partial.remote.etag) and digest != partial.remote.etag:
                    raise RbeeError(
                        f"{partial.remote.name}: sha256 {digest[:12]}… differs from the hub's "
                        f"{partial.remote.etag[:12]}…: corrupt transfer, discarded"
                    )
            except RbeeError:
                partial.discard()
                raise
            digests.append(digest)
        meter.add(0, names[-1], force=True)
        finals = [directory / name for name in names]
        for partial, final in zip(partials, finals, strict=True):
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial.path, final)
            files.fsync_dir(final.parent)
            partial.discard()
        size = sum(f.stat().st_size for f in finals)
        with store.edit() as catalog:
            current = catalog.find(model_id)
            if current is None:
                raise RbeeError(f"model {model_id} was unregistered while it downloaded; files kept in {directory}")
            meta = dict(current.metadata, sha256=digests[0], commit=remotes[0].commit)
            if len(names) > 1:
                meta["files"] = [{"file": n, "sha256": d} for n, d in zip(names, digests, strict=True)]
            for key in ("context_length", "vocab_size"):
                if meta.get(key) is None and key in facts:
                    meta[key] = facts[key]
            arch = current.architecture if current.architecture != "unknown" else facts.get("architecture", "unknown")
            updated = replace(
                current,
                downloaded=True,
                size_bytes=size,
                path=str(finals[0]),
                metadata=meta,
                architecture=arch,
            )
            catalog.put(updated)
    elapsed = time.monotonic() - started
    return {
        "event": "done",
        "model": model_id,
        "already_downloaded": False,
        "path": str(finals[0]),
        "size_bytes": size,
        "sha256": digests[0],
        "bytes_transferred": meter.done - resumed,
        "resumed_from": resumed,
        "elapsed_s": round(elapsed, 3),
        "speed_bps": round((meter.done - resumed) / max(elapsed, 1e-6), 1),
    }


def _on_disk(entry: ModelEntry) -> bool:
    first = Path(entry.path)
    names = split_files(entry.file)
    paths = [first.with_name(Path(n).name) for n in names]
    return all(p.is_file() for p in paths) and sum(p.stat().st_size for p in paths) == entry.size_bytes


def _regenerate_tiny(store: CatalogStore, entry: ModelEntry) -> dict[str, Any]:
    """tiny-test's "download" is its generation: deterministic, local, offline."""
    if entry.downloaded and _on_disk(entry):
        return {
            "event": "done",
            "model": entry.id,
            "already_downloaded": True,
            "path": entry.path,
            "size_bytes": entry.size_bytes,
            "bytes_transferred": 0,
            "resumed_from": 0,
        }
    fresh = store.materialize_tiny_test()
    with store.edit() as catalog:
        catalog.put(fresh)
    return {
        "event": "done",
        "model": entry.id,
        "already_downloaded": False,
        "path": fresh.path,
        "size_bytes": fresh.size_bytes,
        "bytes_transferred": 0,
        "resumed_from": 0,
    }


def verify(store: CatalogStore, model_id: str) -> dict[str, Any]:
    """Re-check a model's files on disk and set its `downloaded` flag to what is true."""
    entry = store.load().get(model_id)
    first = Path(entry.path)
    names = split_files(entry.file)
    sums = {f["file"]: f.get("sha256") for f in entry.metadata.get("files", [])}
    problems: list[str] = []
    digests: list[str] = []
    for n in names:
        path = first.with_name(Path(n).name)
        expected = sums.get(n) if len(names) > 1 else entry.metadata.get("sha256")
        try:
            digests.append(check_file(path, None, expected))
        except (RbeeError, FileNotFoundError) as exc:
            problems.append(str(exc) if isinstance(exc, RbeeError) else f"{path} does not exist")
    ok = not problems
    with store.edit() as catalog:
        current = catalog.get(model_id)
        changes: dict[str, Any] = {"downloaded": ok}
        if ok:
            changes["size_bytes"] = sum(first.with_name(Path(n).name).stat().st_size for n in names)
            if len(names) == 1 and not current.metadata.get("sha256"):
                changes["metadata"] = dict(current.metadata, sha256=digests[0])
        catalog.put(replace(current, **changes))
    return {"model": model_id, "ok": ok, "problems": problems, "path": entry.path}


def unregister(store: CatalogStore, model_id: str, delete_files: bool) -> dict[str, Any]:
    """Remove a model from the catalog, and its files when asked."""
    ensure_not_tiny(model_id)
    with store.edit() as catalog:
        entry = catalog.remove(model_id)
    removed = False
    if delete_files:
        import shutil

        directory = model_dir(store.models_dir, model_id)
        if directory.exists():
            shutil.rmtree(directory)
            removed = True
    return {"model": entry.id, "unregistered": True, "files_deleted": removed}
