"""Checks that a model file is whole: GGUF magic and version, expected size, sha256."""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path
from typing import Any

from rbee_tui.errors import RbeeError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<idx>\d{5})-of-(?P<count>\d{5})\.gguf$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def split_files(file: str) -> list[str]:
    """All files of a model: a split GGUF `x-00001-of-00003.gguf` names its siblings, anything else itself."""
    m = _SPLIT.match(file)
    if not m:
        return [file]
    count = int(m.group("count"))
    if int(m.group("idx")) != 1 or count < 1:
        raise RbeeError(f"{file} is not the first part of a split model", "register the -00001-of-N file")
    return [f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def looks_like_sha256(value: str | None) -> bool:
    """True when an etag is a sha256 (the hub's LFS etags are)."""
    return bool(value and _SHA256.match(value))


def sha256_file(path: Path, chunk: int = 4 << 20) -> str:
    """The hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_gguf_header(path: Path) -> int:
    """Return the GGUF version of `path`, or raise a one-line error saying why it is not a GGUF file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise RbeeError(f"{path} does not exist") from None
    if len(head) < 8:
        raise RbeeError(f"{path} is truncated ({len(head)} bytes): not a GGUF file")
    if head[:4] != GGUF_MAGIC:
        raise RbeeError(f"{path} is not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in GGUF_VERSIONS:
        raise RbeeError(f"{path} has GGUF version {version}; llama.cpp reads versions 2 and 3")
    return version


def check_gguf_structure(path: Path) -> dict[str, Any]:
    """Raise a one-line error when the header is fine but the tensors do not fit the file (a truncated file).

    Returns the facts read on the way (architecture, context length, vocabulary size), so no caller parses twice.
    """
    check_gguf_header(path)
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RbeeError(f"{path} is truncated or malformed: {reason}") from None
    return _facts(reader)


def check_file(path: Path, expected_size: int | None, sha256: str | None) -> str:
    """Check size, GGUF structure and sha256 of a complete file; return its sha256."""
    size = path.stat().st_size
    if expected_size and size != expected_size:
        raise RbeeError(f"{path} has {size} bytes, expected {expected_size}: incomplete or wrong file")
    check_gguf_structure(path)
    digest = sha256_file(path)
    if looks_like_sha256(sha256) and digest != sha256:
        raise RbeeError(f"{path} has sha256 {digest[:12]}…, expected {sha256[:12]}…: corrupt download")
    return digest


def gguf_facts(path: Path) -> dict[str, Any]:
    """Architecture, context length and vocabulary size read from a GGUF header (empty if unreadable)."""
    try:
        from gguf import GGUFReader

        return _facts(GGUFReader(path))
    except Exception:
        return {}


def _facts(reader: Any) -> dict[str, Any]:
    try:
        arch = _field(reader, "general.architecture")
        facts: dict[str, Any] = {"architecture": arch}
        if arch:
            facts["context_length"] = _field(reader, f"{arch}.context_length")
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is not None:
            facts["vocab_size"] = len(tokens.data)
        return {k: v for k, v in facts.items() if v is not None}
    except Exception:  # facts are a bonus; an odd header must not fail a download
        return {}


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.parts[f.data[0]]
    if value.dtype.kind == "u" and value.dtype.itemsize == 1:
        return bytes(value).decode("utf-8", "replace")
    return value.tolist()[0] if len(value) == 1 else value.tolist()
