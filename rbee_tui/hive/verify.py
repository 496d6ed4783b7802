"""`rbee-hive models verify`: re-check a model's files on disk (size, GGUF structure, sha256) and mark it so."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from rbee_tui import gguf_file
from rbee_tui.catalog import CatalogStore
from rbee_tui.errors import RbeeError
from rbee_tui.gguf_file import split_files
from rbee_tui.hive.hashing import looks_like_sha256, sha256_file

# Only for rbee_tui/worker/ (server.py, proxy.py), which still import it from here: it goes once they use gguf_file.


def check_file(path: Path, expected_size: int | None, sha256: str | None) -> str:
    """Check size, GGUF structure and sha256 of a complete file; return its sha256."""
    size = path.stat().st_size
    if expected_size and size != expected_size:
        raise RbeeError(f"{path} has {size} bytes, expected {expected_size}: incomplete or wrong file")
    gguf_file.read(path)  # the structure check: every tensor must fit in the file
    digest = sha256_file(path)
    if looks_like_sha256(sha256) and digest != sha256:
        raise RbeeError(f"{path} has sha256 {digest[:12]}…, expected {sha256[:12]}…: corrupt download")
    return digest


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
