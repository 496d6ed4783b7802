"""The per-pool model catalog (`<models_dir>/catalog.json`) and its locked, atomic store."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rbee_tui import files, gguf_file
from rbee_tui.cluster.layers import ModelShape
from rbee_tui.errors import CorruptFileError, RbeeError
from rbee_tui.hive.hashing import sha256_file
from rbee_tui.names import check_backends, check_id, check_repo, check_repo_file
from rbee_tui.registry import DEFAULT_MODELS, TINY_TEST_MODEL
from rbee_tui.tinymodel import TINY_TEST_ID, write_model

CATALOG_VERSION = "1.0"
CATALOG_FILE = "catalog.json"
SHAPES_FILE = ".shapes.json"  # beside the catalog: each model file's shape, read once (see ShapeCache)


@dataclass(frozen=True)
class ModelEntry:
    """One model in a pool's catalog, in the seeds' shape (`size_bytes` instead of `size_gb`)."""

    id: str
    name: str
    path: str
    format: str = "gguf"
    size_bytes: int = 0
    architecture: str = "unknown"
    downloaded: bool = False
    backends: tuple[str, ...] = ("cpu",)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def repo(self) -> str | None:
        """The hub repository, or None for a generated model."""
        return self.metadata.get("repo")

    @property
    def file(self) -> str:
        """The model's (first) file inside the repository."""
        return self.metadata.get("file", "")

    def to_json(self) -> dict[str, Any]:
        """The entry as stored in catalog.json."""
        out = asdict(self)
        out["backends"] = list(self.backends)
        out["metadata"] = copy.deepcopy(self.metadata)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ModelEntry:
        """Read an entry, tolerating the seeds' `size_gb` field."""
        size = raw.get("size_bytes")
        if size is None and raw.get("size_gb") is not None:
            size = int(float(raw["size_gb"]) * 1e9)
        return cls(
            id=str(raw["id"]),
            name=str(raw.get("name", raw["id"])),
            path=str(raw.get("path", "")),
            format=str(raw.get("format", "gguf")),
            size_bytes=int(size or 0),
            architecture=str(raw.get("architecture", "unknown")),
            downloaded=bool(raw.get("downloaded", False)),
            backends=tuple(raw.get("backends", ["cpu"])),
            metadata=dict(raw.get("metadata", {})),
        )


@dataclass
class Catalog:
    """A pool's catalog: its id and its models, in order of registration."""

    pool_id: str
    models: list[ModelEntry] = field(default_factory=list)
    version: str = CATALOG_VERSION

    def get(self, model_id: str) -> ModelEntry:
        """The entry `model_id`, or an error listing what is registered."""
        for m in self.models:
            if m.id == model_id:
                return m
        known = ", ".join(m.id for m in self.models) or "none"
        raise RbeeError(f"model {model_id!r} is not in the catalog of pool {self.pool_id!r}", f"registered: {known}")

    def find(self, model_id: str) -> ModelEntry | None:
        """The entry `model_id`, or None."""
        return next((m for m in self.models if m.id == model_id), None)

    def put(self, entry: ModelEntry) -> None:
        """Add `entry`, or replace the entry with its id in place."""
        for i, m in enumerate(self.models):
            if m.id == entry.id:
                self.models[i] = entry
                return
        self.models.append(entry)

    def remove(self, model_id: str) -> ModelEntry:
        """Remove and return the entry `model_id`."""
        entry = self.get(model_id)
        self.models = [m for m in self.models if m.id != model_id]
        return entry

    def to_json(self) -> dict[str, Any]:
        """The catalog as stored in catalog.json."""
        return {
            "version": self.version,
            "pool_id": self.pool_id,
            "models": [m.to_json() for m in self.models],
        }

    @classmethod
    def from_json(cls, raw: Any) -> Catalog:
        """Parse catalog.json's document; raises ValueError/KeyError/TypeError when it is not a catalog."""
        if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
            raise ValueError("expected an object with a 'models' array")
        models = [ModelEntry.from_json(m) for m in raw["models"]]
        return cls(pool_id=str(raw.get("pool_id", "")), models=models, version=str(raw.get("version", "1.0")))


def model_dir(models_dir: Path, model_id: str) -> Path:
    """Where a model's files live inside the pool's models dir."""
    return Path(models_dir) / check_id(model_id)


def new_entry(
    models_dir: Path,
    model_id: str,
    *,
    repo: str | None,
    file: str,
    name: str | None = None,
    architecture: str | None = None,
    backends: list[str] | None = None,
    context_length: int | None = None,
    vocab_size: int | None = None,
    size_bytes: int = 0,
    sha256: str | None = None,
    extra: dict[str, Any] | None = None,
) -> ModelEntry:
    """Validate user-given fields and build a not-yet-downloaded entry."""
    check_id(model_id)
    if repo is not None:
        check_repo(repo)
    check_repo_file(file)
    if not file.endswith(".gguf"):
        raise RbeeError(f"file {file!r} is not a .gguf file", "rbee runs GGUF models through llama.cpp")
    metadata: dict[str, Any] = {
        "repo": repo,
        "file": file,
        "context_length": context_length,
        "vocab_size": vocab_size,
        "sha256": sha256,
    }
    metadata.update(extra or {})
    return ModelEntry(
        id=model_id,
        name=name or model_id,
        path=str(model_dir(models_dir, model_id) / file),
        size_bytes=size_bytes,
        architecture=architecture or "unknown",
        backends=tuple(check_backends(backends or ["cpu", "cuda", "metal"])),
        metadata=metadata,
    )


def _from_registry(models_dir: Path, spec: dict[str, Any]) -> ModelEntry:
    meta = dict(spec.get("metadata", {}))
    repo, file = meta.pop("repo", spec.get("repo")), meta.pop("file", spec.get("file", ""))
    return new_entry(
        models_dir,
        spec["id"],
        repo=repo,
        file=file,
        name=spec.get("name"),
        architecture=spec.get("architecture"),
        backends=list(spec.get("backends", ["cpu", "cuda", "metal"])),
        context_length=meta.pop("context_length", None),
        vocab_size=meta.pop("vocab_size", None),
        size_bytes=int(spec.get("size_bytes", 0)),
        sha256=meta.pop("sha256", None),
        extra=meta,
    )


class CatalogStore:
    """Reads and writes one pool's catalog: every change is locked against other writers and atomic."""

    def __init__(self, models_dir: Path, pool_id: str, extra_models: tuple[dict[str, Any], ...] = ()) -> None:
        self.models_dir = Path(models_dir).expanduser()
        self.pool_id = pool_id
        self.extra_models = extra_models
        self.path = self.models_dir / CATALOG_FILE

    def _read(self) -> Catalog | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return Catalog.from_json(json.loads(raw.decode("utf-8")))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CorruptFileError(
                str(self.path),
                reason,
                "run `rbee-hive models repair` to keep it aside and start a fresh catalog",
            ) from None

    def _write(self, catalog: Catalog) -> None:
        files.atomic_write_json(self.path, catalog.to_json())

    def _default(self) -> Catalog:
        catalog = Catalog(pool_id=self.pool_id)
        for spec in (*DEFAULT_MODELS, *self.extra_models):
            catalog.put(_from_registry(self.models_dir, spec))
        catalog.put(self.materialize_tiny_test())
        return catalog

    def materialize_tiny_test(self) -> ModelEntry:
        """Generate the bundled tiny model into the models dir and return its downloaded entry."""
        entry = _from_registry(self.models_dir, TINY_TEST_MODEL)
        path = write_model(Path(entry.path))
        vocab_size = gguf_file.read(path).facts().get("vocab_size")
        meta = dict(entry.metadata, sha256=sha256_file(path), vocab_size=vocab_size)
        return replace(entry, downloaded=True, size_bytes=path.stat().st_size, metadata=meta)

    def load(self) -> Catalog:
        """The catalog; a pool with none gets the default one written first."""
        catalog = self._read()
        if catalog is not None:
            return catalog
        with files.locked(self.path):
            catalog = self._read()
            if catalog is None:
                catalog = self._default()
                self._write(catalog)
        return catalog

    @contextlib.contextmanager
    def edit(self) -> Iterator[Catalog]:
        """Lock, read, let the caller change the catalog, then write it back atomically."""
        with files.locked(self.path):
            catalog = self._read()
            if catalog is None:
                catalog = self._default()
            yield catalog
            self._write(catalog)

    def repair(self) -> Path | None:
        """Keep a corrupt catalog aside as `catalog.json.corrupt-<time>` and write a fresh one."""
        with files.locked(self.path):
            try:
                self._read()
                return None
            except CorruptFileError:
                kept = files.keep_aside(self.path, time.strftime("%Y%m%dT%H%M%S"))
            self._write(self._default())
        return kept


class ShapeCache:
    """Each model file's shape (what its memory prediction needs), read from the GGUF header once and kept by
    path, size and mtime in `<models_dir>/.shapes.json`, so listing a catalog stays fast however big the models.

    Every `rbee-hive` call is a process of its own (or a fork of the agent), so the cache lives on disk; a file
    that changed is read again, and an entry whose file is gone is dropped on the next write.
    """

    def __init__(self, models_dir: Path) -> None:
        self.path = Path(models_dir).expanduser() / SHAPES_FILE

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return {}  # a cache: a lost or damaged one is simply rebuilt
        return doc if isinstance(doc, dict) else {}

    def shapes(self, paths: list[Path]) -> dict[str, ModelShape | None]:
        """The shape of each file (None where it cannot be read), read from disk only when not cached."""
        from rbee_tui.cluster.layers import read_shape, shape_from_json, shape_to_json

        cached = self._read()
        out: dict[str, ModelShape | None] = {}
        changed = False
        for path in paths:
            key = str(path)
            try:
                st = path.stat()
            except OSError:
                out[key] = None
                continue
            stamp = [st.st_size, st.st_mtime_ns]
            hit = cached.get(key)
            if isinstance(hit, dict) and hit.get("stamp") == stamp:
                with contextlib.suppress(RbeeError, TypeError, KeyError):
                    out[key] = shape_from_json(hit["shape"])
                    continue
            try:
                shape = read_shape(path)
            except (RbeeError, OSError):
                out[key] = None
                continue
            out[key] = shape
            cached[key] = {"stamp": stamp, "shape": shape_to_json(shape)}
            changed = True
        if changed:
            live = {k: v for k, v in cached.items() if Path(k).exists()}
            with contextlib.suppress(OSError):  # a read-only models dir: predictions still work, uncached
                files.atomic_write_json(self.path, live)
        return out

    def shape(self, path: Path) -> ModelShape:
        """The shape of one model file, or a clear error when its header cannot be read."""
        shape = self.shapes([Path(path)])[str(path)]
        if shape is None:
            from rbee_tui.cluster.layers import read_shape

            return read_shape(Path(path))  # raises with the reason
        return shape


def with_memory(catalog: Catalog, models_dir: Path) -> dict[str, Any]:
    """The catalog as `rbee-hive models catalog --json` prints it: each downloaded model with a `memory` object,
    the prediction for a worker of the default engine at its default context (rbee_tui/capacity.py), and its
    `vram`: what the same worker would take of a GPU's memory."""
    from rbee_tui.capacity import ENGINE_EMBEDDED, default_ctx, predict_worker

    doc = catalog.to_json()
    ready = [Path(m.path) for m in catalog.models if m.downloaded and m.path]
    shapes = ShapeCache(models_dir).shapes(ready) if ready else {}
    for raw, entry in zip(doc["models"], catalog.models, strict=True):
        shape = shapes.get(str(Path(entry.path))) if entry.downloaded and entry.path else None
        if shape is not None:
            ctx = default_ctx(shape.n_ctx_train)
            raw["memory"] = predict_worker(shape, ctx, "cpu", 1, ENGINE_EMBEDDED).to_json()
            # The same worker offloaded to a GPU: what it takes of the GPU's memory.
            raw["memory"]["vram"] = predict_worker(shape, ctx, "cuda", 1, ENGINE_EMBEDDED).total
    return doc


def human_size(n: int) -> str:
    """Decimal size as the seeds print it: `2.2 GB`, `491.4 MB`."""
    if n <= 0:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def render_table(catalog: Catalog) -> str:
    """The seeds' "Model Catalog for <pool>" listing."""
    width = 100
    lines = [f"Model Catalog for {catalog.pool_id}", "=" * width]
    lines.append(f"{'ID':<16}{'Name':<40}{'Arch':<10}{'Downloaded':<12}{'Size':<10}Backends")
    lines.append("-" * width)
    for m in catalog.models:
        mark = "✅" if m.downloaded else "❌"
        # The emoji is two cells wide: pad one less so the columns stay aligned in a terminal.
        lines.append(
            f"{m.id:<16}{m.name[:39]:<40}{m.architecture[:9]:<10}{mark:<11}{human_size(m.size_bytes):<10}"
            f"{','.join(m.backends)}"
        )
    lines.append("=" * width)
    lines.append(f"Total models: {len(catalog.models)} ({sum(m.downloaded for m in catalog.models)} downloaded)")
    return "\n".join(lines)


def ensure_not_tiny(model_id: str) -> None:
    """Refuse operations that make no sense for the generated model."""
    if model_id == TINY_TEST_ID:
        raise RbeeError("tiny-test is generated locally and cannot be changed", "register a new id instead")
