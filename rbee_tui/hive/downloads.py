"""A model's download end to end: each file fetched (hive/transfer.py), checked, moved into place, and only then
the model marked downloaded in the catalog; and unregistering a model.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from rbee_tui import files, gguf_file
from rbee_tui.catalog import CatalogStore, ModelEntry, ensure_not_tiny, model_dir
from rbee_tui.errors import RbeeError
from rbee_tui.gguf_file import split_files
from rbee_tui.hive.hashing import looks_like_sha256
from rbee_tui.hive.hub import offline_check, resolve
from rbee_tui.hive.transfer import Meter, Partial, Progress, fetch
from rbee_tui.tinymodel import TINY_TEST_ID


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
        return _already_downloaded(entry)
    if not entry.repo:
        raise RbeeError(f"model {model_id} has no repository to download from", "register it with --repo")
    offline_check()
    directory = model_dir(store.models_dir, model_id)
    with files.try_locked(directory / ".download", f"a download of {model_id} is already running"):
        names = split_files(entry.file)
        remotes = [resolve(entry.repo, name, hub) for name in names]
        partials = [Partial(directory, r) for r in remotes]
        resumed = sum(p.size() for p in partials)
        total = sum(r.size or 0 for r in remotes)
        meter = Meter(model_id, total, resumed, on_progress)
        started = time.monotonic()
        meter.add(0, names[0], force=True)
        digests = []
        facts: dict[str, Any] = {}
        for partial in partials:
            digest = fetch(partial, meter, cancel, hub, entry.repo)
            checked = _check(partial, digest)
            facts = facts or checked  # the first file's header describes the model
            digests.append(digest)
        meter.add(0, names[-1], force=True)
        finals = [directory / name for name in names]
        for partial, final in zip(partials, finals, strict=True):
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial.path, final)
            files.fsync_dir(final.parent)
            partial.discard()
        size = sum(f.stat().st_size for f in finals)
        _mark_downloaded(store, model_id, directory, names, digests, remotes[0].commit, facts)
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


def _check(partial: Partial, digest: str) -> dict[str, Any]:
    """Check a fetched file against its header and the hub's size and sha256; discard it if it fails.

    Returns the facts its header gives (architecture, context length, vocabulary size).
    """
    remote = partial.remote
    try:
        facts = gguf_file.read(partial.path).facts()
        if remote.size is not None and partial.path.stat().st_size != remote.size:
            raise RbeeError(f"{remote.name}: size differs from the hub's {remote.size}")
        if looks_like_sha256(remote.etag) and digest != remote.etag:
            raise RbeeError(
                f"{remote.name}: sha256 {digest[:12]}… differs from the hub's {remote.etag[:12]}…: "
                "corrupt transfer, discarded"
            )
    except RbeeError:
        partial.discard()
        raise
    return facts


def _mark_downloaded(
    store: CatalogStore,
    model_id: str,
    directory: Path,
    names: list[str],
    digests: list[str],
    commit: str | None,
    facts: dict[str, Any],
) -> None:
    """Record the files now in `directory` in the catalog: downloaded, size, sha256s, and what the header told."""
    finals = [directory / name for name in names]
    with store.edit() as catalog:
        current = catalog.find(model_id)
        if current is None:
            raise RbeeError(f"model {model_id} was unregistered while it downloaded; files kept in {directory}")
        meta = dict(current.metadata, sha256=digests[0], commit=commit)
        if len(names) > 1:
            meta["files"] = [{"file": n, "sha256": d} for n, d in zip(names, digests, strict=True)]
        for key in ("context_length", "vocab_size"):
            if meta.get(key) is None and key in facts:
                meta[key] = facts[key]
        arch = current.architecture if current.architecture != "unknown" else facts.get("architecture", "unknown")
        updated = replace(
            current,
            downloaded=True,
            size_bytes=sum(f.stat().st_size for f in finals),
            path=str(finals[0]),
            metadata=meta,
            architecture=arch,
        )
        catalog.put(updated)


def _already_downloaded(entry: ModelEntry) -> dict[str, Any]:
    return {
        "event": "done",
        "model": entry.id,
        "already_downloaded": True,
        "path": entry.path,
        "size_bytes": entry.size_bytes,
        "bytes_transferred": 0,
        "resumed_from": 0,
    }


def _on_disk(entry: ModelEntry) -> bool:
    first = Path(entry.path)
    names = split_files(entry.file)
    paths = [first.with_name(Path(n).name) for n in names]
    return all(p.is_file() for p in paths) and sum(p.stat().st_size for p in paths) == entry.size_bytes


def _regenerate_tiny(store: CatalogStore, entry: ModelEntry) -> dict[str, Any]:
    """tiny-test's "download" is its generation: deterministic, local, offline."""
    if entry.downloaded and _on_disk(entry):
        return _already_downloaded(entry)
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
