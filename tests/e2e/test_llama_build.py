"""llama.cpp compiled once per node: the build's libllama serves llama-cpp-python (the embedded engine), and
rbee_tui points a llama-cpp-python without a library of its own at it (rbee_tui/llama_build.py)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from rbee_tui.llama_build import LIB, flavour, gpu_offload, lib_dir
from rbee_tui.tinymodel import write_model

VERSION = importlib.metadata.version("llama-cpp-python")
BUILT = lib_dir(VERSION)
needs_build = pytest.mark.skipif(BUILT is None, reason=f"no llama.cpp build of {VERSION} with {LIB}")

GENERATE = textwrap.dedent(
    """
    import json, sys
    import llama_cpp
    llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=128, verbose=False, seed=1)
    out = llm.create_completion("hello", max_tokens=8, temperature=0)
    print(json.dumps({"lib": llama_cpp.llama_cpp._lib._name, "tokens": out["usage"]["completion_tokens"]}))
    """
)


@needs_build
def test_the_embedded_engine_runs_on_the_builds_library(tmp_path: Path) -> None:
    """The library the build installs is the one llama-cpp-python's bindings were written for: a model loads
    and generates through it."""
    model = write_model(tmp_path / "tiny.gguf")
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(BUILT)}
    proc = subprocess.run(
        [sys.executable, "-c", GENERATE, str(model)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["lib"]).parent == BUILT
    assert out["tokens"] > 0


def _fake_package(root: Path) -> None:
    """A llama_cpp package without a lib/ (as `-DLLAMA_BUILD=OFF` installs it), and its metadata."""
    (root / "llama_cpp").mkdir(parents=True)
    (root / "llama_cpp" / "__init__.py").write_text("")
    info = root / "llama_cpp_python-7.7.7.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llama-cpp-python\nVersion: 7.7.7\n")


@pytest.mark.parametrize("lib_in_package", [False, True])
def test_rbee_tui_points_a_library_less_llama_cpp_at_the_build(tmp_path: Path, lib_in_package: bool) -> None:
    site, cache = tmp_path / "site", tmp_path / "cache"
    _fake_package(site)
    if lib_in_package:
        (site / "llama_cpp" / "lib").mkdir()
        (site / "llama_cpp" / "lib" / LIB).write_bytes(b"\x7fELF")

    def build(cmake_args: str, old: bool = False) -> Path:
        bin_dir = cache / f"7.7.7-{flavour(cmake_args)}" / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / LIB).write_bytes(b"\x7fELF")
        if old:
            os.utime(bin_dir, (1, 1))
        return bin_dir

    build("", old=True)
    cuda = build("-DGGML_CUDA=ON")
    probe = "import os, rbee_tui; print(os.environ.get('LLAMA_CPP_LIB_PATH', ''))"
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "CMAKE_ARGS")}
    env |= {
        "PYTHONPATH": f"{site}{os.pathsep}{Path(__file__).resolve().parents[2]}",
        "RBEE_LLAMA_CPP_CACHE": str(cache),
    }

    def pointed(**extra: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env={**env, **extra}
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    if lib_in_package:
        assert pointed() == ""  # a llama-cpp-python with its own library is left alone
        return
    assert pointed() == str(cuda)  # the newest build of this version
    native = {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"}
    assert pointed(**native) == str(cuda)  # no build of that flavour: still the newest
    flavoured = build("-DGGML_NATIVE=OFF", old=True)
    assert pointed(**native) == str(flavoured)  # the flavour of $CMAKE_ARGS first, even when older
    assert pointed(LLAMA_CPP_LIB_PATH="/elsewhere") == "/elsewhere"  # the user's own choice stays


@pytest.mark.parametrize(
    ("offload", "rpc", "beside", "expected"),
    [
        (False, False, [], False),  # a CPU build
        (True, False, [], True),  # a GPU build without RPC: its word is taken
        (True, True, [], False),  # the node build: RPC says "offload", no GPU backend beside libllama
        (True, True, ["libggml-cuda.so"], True),  # a CUDA node build
    ],
)
def test_a_build_with_rpc_alone_is_not_a_gpu_build(
    tmp_path: Path, offload: bool, rpc: bool, beside: list[str], expected: bool
) -> None:
    """llama_supports_gpu_offload is also true for the RPC backend, which every node's build has; taking it for a
    GPU would refuse warm (forked) CPU workers and offer a cuda backend that is not there."""
    for name in (LIB, *beside):
        (tmp_path / name).write_bytes(b"\x7fELF")
    binding = SimpleNamespace(
        llama_supports_gpu_offload=lambda: offload,
        llama_supports_rpc=lambda: rpc,
        llama_cpp=SimpleNamespace(_lib=SimpleNamespace(_name=str(tmp_path / LIB))),
    )
    assert gpu_offload(binding) is expected


@needs_build
def test_the_builds_library_is_not_taken_for_a_gpu(tmp_path: Path) -> None:
    probe = "import llama_cpp; from rbee_tui.llama_build import gpu_offload; print(gpu_offload(llama_cpp))"
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(BUILT)}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    gpu = any(BUILT.glob("libggml-cuda.*"))
    assert proc.stdout.strip() == str(gpu)
