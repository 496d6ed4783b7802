"""Reading GGUF files: the header check, metadata, the tensor table, and the parts of a split model.

The one place that opens a GGUF file to read it: the catalog, downloads, verify, the worker and the cluster
planner all come here. The `gguf` library (and numpy with it) loads slowly, so only `read` imports it; the
header check and the split-file names need neither.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rbee_tui.errors import RbeeError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<idx>\d{5})-of-(?P<count>\d{5})\.gguf$")
_TOKENS = "tokenizer.ggml.tokens"


def split_files(file: str) -> list[str]:
    """All files of a model: a split GGUF `x-00001-of-00003.gguf` names its siblings, anything else itself."""
    m = _SPLIT.match(file)
    if not m:
        return [file]
    count = int(m.group("count"))
    if int(m.group("idx")) != 1 or count < 1:
        raise RbeeError(f"{file} is not the first part of a split model", "register the -00001-of-N file")
    return [f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def split_paths(first: Path) -> list[Path]:
    """The paths of every part of the model whose first file is `first`, all beside it."""
    return [first.with_name(name) for name in split_files(first.name)]


def check_header(path: Path) -> int:
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


@dataclass(frozen=True)
class Tensor:
    """One entry of a GGUF file's tensor table."""

    name: str
    n_bytes: int
    shape: tuple[int, ...]  # ggml's order: ne[0] (the row length) first


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata and tensor table (for a split model, the first part's metadata, every part's tensors)."""

    path: Path
    version: int
    fields: Mapping[str, Any] = field(repr=False)  # gguf's ReaderField by key: read them through get and count
    tensors: tuple[Tensor, ...] = ()

    def get(self, key: str) -> Any:
        """A metadata value: str, int, float or bool, a list for an array; None when the file has no such key."""
        f = self.fields.get(key)
        if f is None:
            return None
        from gguf import GGUFValueType

        if f.types == [GGUFValueType.STRING]:
            # Decoded leniently: one odd byte in a name must not make the whole header unreadable.
            return bytes(f.parts[-1]).decode("utf-8", "replace")
        value = f.contents()
        return value.tolist() if hasattr(value, "tolist") else value

    def count(self, key: str) -> int:
        """How many entries an array has, without decoding them (a vocabulary holds 100k+ strings); 0 if absent."""
        f = self.fields.get(key)
        return 0 if f is None else len(f.data)

    def facts(self) -> dict[str, Any]:
        """Architecture, context length and vocabulary size, the ones the header gives (empty if it is odd)."""
        try:
            arch = self.get("general.architecture")
            out: dict[str, Any] = {"architecture": arch}
            if arch:
                out["context_length"] = self.get(f"{arch}.context_length")
            if _TOKENS in self.fields:
                out["vocab_size"] = self.count(_TOKENS)
            return {k: v for k, v in out.items() if v is not None}
        except Exception:  # facts are a bonus; an odd header must not fail a download
            return {}


def read(path: Path, *, parts: bool = False) -> GGUFFile:
    """Check the header, then read the metadata and tensor table; with `parts`, every part of a split model.

    This is the structure check too: a file whose tensors do not fit in it (a truncated download) gets a
    one-line error, as do a missing part and anything that is not GGUF.
    """
    path = Path(path)
    version = check_header(path)
    from gguf import GGUFReader  # here: gguf and numpy load slowly and only this needs them

    files = split_paths(path) if parts else [path]
    readers = []
    tensors: list[Tensor] = []
    for part in files:
        try:
            reader = GGUFReader(part)
            tensors += [Tensor(t.name, int(t.n_bytes), tuple(int(x) for x in t.shape)) for t in reader.tensors]
        except FileNotFoundError:
            raise RbeeError(f"{part} is missing: a split model needs every part") from None
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RbeeError(f"{part} is truncated or malformed: {reason}") from None
        readers.append(reader)
    return GGUFFile(path, version, readers[0].fields, tuple(tensors))
