"""The catalog: defaults, register/unregister/update, atomic and locked writes, corrupt files."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rbee_tui.catalog import CatalogStore, new_entry
from rbee_tui.errors import CorruptFileError, RbeeError
from tests.conftest import REPO_ROOT, wait_for

SEED_IDS = ["qwen-0.5b", "tinyllama", "phi3", "mistral", "tiny-test"]


def test_default_catalog_has_the_seed_models_and_a_ready_tiny_test(models_dir: Path) -> None:
    store = CatalogStore(models_dir, "local")
    catalog = store.load()
    assert [m.id for m in catalog.models] == SEED_IDS
    assert catalog.pool_id == "local"
    on_disk = json.loads((models_dir / "catalog.json").read_text())
    assert on_disk["version"] == "1.0" and on_disk["pool_id"] == "local"
    assert set(on_disk["models"][0]) >= {
        "id",
        "name",
        "path",
        "format",
        "size_bytes",
        "architecture",
        "downloaded",
        "backends",
        "metadata",
    }
    assert set(on_disk["models"][0]["metadata"]) >= {"repo", "file", "context_length", "vocab_size", "sha256"}
    for m in catalog.models[:4]:
        assert m.repo and m.file.endswith(".gguf") and not m.downloaded
    tiny = catalog.get("tiny-test")
    assert tiny.downloaded
    data = Path(tiny.path).read_bytes()
    assert len(data) < 2_000_000
    assert tiny.metadata["sha256"] == hashlib.sha256(data).hexdigest()
    # the bundled fixture is exactly what the generator makes
    assert data == (REPO_ROOT / "fixtures" / "tiny-test.gguf").read_bytes()


def test_register_update_unregister(models_dir: Path) -> None:
    store = CatalogStore(models_dir, "local")
    entry = new_entry(
        models_dir,
        "gemma-2b",
        repo="google/gemma-2b-GGUF",
        file="gemma-2b.Q4_K_M.gguf",
        name="Gemma 2B",
        architecture="gemma",
        backends=["cpu", "cuda"],
    )
    with store.edit() as cat:
        cat.put(entry)
    assert store.load().get("gemma-2b").backends == ("cpu", "cuda")
    with store.edit() as cat:
        cat.put(cat.get("gemma-2b").__class__(**{**cat.get("gemma-2b").__dict__, "name": "Gemma 2B v2"}))
    assert store.load().get("gemma-2b").name == "Gemma 2B v2"
    assert [m.id for m in store.load().models][-1] == "gemma-2b"
    with store.edit() as cat:
        cat.remove("gemma-2b")
    assert store.load().find("gemma-2b") is None
    with pytest.raises(RbeeError, match="not in the catalog"):
        store.load().get("gemma-2b")


def test_new_entry_refuses_bad_input(models_dir: Path) -> None:
    for bad_id in ["../x", "a b", "$(id)"]:
        with pytest.raises(RbeeError, match="invalid model id"):
            new_entry(models_dir, bad_id, repo="a/b", file="x.gguf")
    with pytest.raises(RbeeError, match=r"not a \.gguf"):
        new_entry(models_dir, "ok", repo="a/b", file="model.safetensors")
    with pytest.raises(RbeeError, match="unknown backend"):
        new_entry(models_dir, "ok", repo="a/b", file="x.gguf", backends=["vulkan"])


def test_corrupt_catalog_is_reported_kept_and_repairable(models_dir: Path) -> None:
    store = CatalogStore(models_dir, "local")
    store.load()
    garbage = b'{"version": "1.0", "models": [ {"id": '
    store.path.write_bytes(garbage)
    with pytest.raises(CorruptFileError) as err:
        store.load()
    assert str(store.path) in str(err.value)
    with pytest.raises(CorruptFileError), store.edit():
        pass
    assert store.path.read_bytes() == garbage, "a corrupt catalog must never be overwritten silently"
    kept = store.repair()
    assert kept is not None and kept.read_bytes() == garbage
    assert kept.name.startswith("catalog.json.corrupt-")
    assert [m.id for m in store.load().models] == SEED_IDS


WRITER = """
import sys
from pathlib import Path
from rbee_tui import files
path = Path(sys.argv[1])
n = 0
while True:
    n += 1
    files.atomic_write_json(path, {"generation": n, "padding": "x" * 40_000_000})
"""


def test_kill_mid_write_leaves_the_old_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "catalog.json"
    target.write_text(json.dumps({"generation": 0}))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
    try:
        # Wait until a temp file is being written, then kill the writer in the middle of it.
        wait_for(lambda: list(tmp_path.glob(".catalog.json.*.tmp")), timeout=30, interval=0.001, what="a temp file")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
    doc = json.loads(target.read_text())  # the file is whole: the old one or a complete new one
    assert doc["generation"] >= 0
    if doc["generation"]:
        assert len(doc["padding"]) == 40_000_000


REGISTRAR = """
import sys
from pathlib import Path
from rbee_tui.catalog import CatalogStore, new_entry
store = CatalogStore(Path(sys.argv[1]), "local")
for i in range(15):
    with store.edit() as cat:
        cat.put(new_entry(store.models_dir, f"{sys.argv[2]}-{i}", repo="a/b", file="m.gguf"))
"""


def test_two_writers_lose_nothing(models_dir: Path) -> None:
    CatalogStore(models_dir, "local").load()
    procs = [subprocess.Popen([sys.executable, "-c", REGISTRAR, str(models_dir), tag]) for tag in ("a", "b")]
    for p in procs:
        assert p.wait(60) == 0
    ids = {m.id for m in CatalogStore(models_dir, "local").load().models}
    assert {f"{t}-{i}" for t in "ab" for i in range(15)} <= ids
