"""The generated models are deterministic, small, and llama.cpp runs them for real."""

from __future__ import annotations

from pathlib import Path

from rbee_tui.tinymodel import TINY_TEST, TinySpec, write_model
from tests.conftest import REPO_ROOT


def test_generation_is_deterministic_and_matches_the_fixture(tmp_path: Path) -> None:
    path = write_model(tmp_path / "t.gguf")
    assert path.read_bytes() == (REPO_ROOT / "fixtures" / "tiny-test.gguf").read_bytes()
    assert path.stat().st_size < 2_000_000
    other = write_model(tmp_path / "o.gguf", TinySpec(seed=TINY_TEST.seed + 1))
    assert other.read_bytes() != path.read_bytes()


def test_llama_cpp_loads_and_generates(tmp_path: Path) -> None:
    import llama_cpp

    for spec in (TINY_TEST, TinySpec(name="q", arch="qwen2", n_embd=96, n_head=4, n_head_kv=4, seed=3)):
        path = write_model(tmp_path / f"{spec.arch}.gguf", spec)
        llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False)
        assert llm.metadata["general.architecture"] == spec.arch
        out = llm.create_completion("Hello, how are you? 🐝", max_tokens=8, temperature=0.0, seed=42)
        assert out["usage"]["completion_tokens"] == 8
        again = llm.create_completion("Hello, how are you? 🐝", max_tokens=8, temperature=0.0, seed=42)
        assert again["choices"][0]["text"] == out["choices"][0]["text"]
        llm.close()
