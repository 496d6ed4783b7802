"""Reading GGUF files: header checks, metadata, the tensor table and split-model parts, on generated models."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from rbee_tui import gguf_file
from rbee_tui.errors import RbeeError
from rbee_tui.tinymodel import TinySpec, vocabulary, write_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf", TinySpec(n_layer=3, n_ctx=1024))


def test_split_files_names_every_part_and_refuses_a_later_one() -> None:
    assert gguf_file.split_files("m.gguf") == ["m.gguf"]
    assert gguf_file.split_files("sub/m-00001-of-00003.gguf") == [
        "sub/m-00001-of-00003.gguf",
        "sub/m-00002-of-00003.gguf",
        "sub/m-00003-of-00003.gguf",
    ]
    with pytest.raises(RbeeError, match="not the first part of a split model"):
        gguf_file.split_files("m-00002-of-00003.gguf")
    assert gguf_file.split_paths(Path("/d/m-00001-of-00002.gguf")) == [
        Path("/d/m-00001-of-00002.gguf"),
        Path("/d/m-00002-of-00002.gguf"),
    ]


def test_header_check_says_why_a_file_is_not_gguf(tmp_path: Path, tiny: Path) -> None:
    assert gguf_file.check_header(tiny) == 3
    cases = {
        "missing.gguf": (None, "does not exist"),
        "short.gguf": (b"GGU", "truncated \\(3 bytes\\)"),
        "html.gguf": (b"<html>\n</html>", "not a GGUF file \\(magic b'<htm'"),
        "v9.gguf": (b"GGUF" + struct.pack("<I", 9), "GGUF version 9; llama.cpp reads versions 2 and 3"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(RbeeError, match=message):
            gguf_file.check_header(path)
        with pytest.raises(RbeeError, match=message):
            gguf_file.read(path)


def test_read_gives_metadata_tensors_and_facts(tiny: Path) -> None:
    spec = TinySpec(n_layer=3, n_ctx=1024)
    model = gguf_file.read(tiny)
    assert (model.path, model.version) == (tiny, 3)
    assert model.get("general.architecture") == "llama"
    assert model.get("general.name") == "rbee tiny-test"
    assert model.get("llama.block_count") == 3
    assert model.get("llama.rope.freq_base") == 10000.0
    assert model.get("no.such.key") is None
    n_vocab = len(vocabulary(spec)[0])
    assert model.count("tokenizer.ggml.tokens") == n_vocab
    assert model.count("no.such.key") == 0
    assert model.facts() == {"architecture": "llama", "context_length": 1024, "vocab_size": n_vocab}
    by_name = {t.name: t for t in model.tensors}
    assert len(by_name) == 3 + 9 * 3  # embeddings, output norm, output; nine tensors per layer
    embd = by_name["token_embd.weight"]
    assert embd.shape == (spec.n_embd, n_vocab)  # ggml's order: the row length first
    assert embd.n_bytes == 4 * spec.n_embd * n_vocab  # f32
    assert sum(t.n_bytes for t in model.tensors) == 4 * spec.param_count()


def test_a_truncated_file_fails_the_structure_check(tmp_path: Path, tiny: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[: tiny.stat().st_size - 100])
    assert gguf_file.check_header(cut) == 3  # the header alone cannot tell
    with pytest.raises(RbeeError, match=r"cut\.gguf is truncated or malformed"):
        gguf_file.read(cut)


def test_a_split_model_is_read_part_by_part(tmp_path: Path, tiny: Path) -> None:
    first, second = tmp_path / "m-00001-of-00002.gguf", tmp_path / "m-00002-of-00002.gguf"
    shutil.copy(tiny, first)
    one = gguf_file.read(first)  # without parts: the first file alone
    with pytest.raises(RbeeError, match=r"m-00002-of-00002\.gguf is missing: a split model needs every part"):
        gguf_file.read(first, parts=True)
    shutil.copy(tiny, second)
    both = gguf_file.read(first, parts=True)
    assert both.tensors == one.tensors * 2
    assert both.get("general.architecture") == "llama"
