"""Where this machine's llama.cpp build lives, and pointing llama-cpp-python at it.

llama.cpp is compiled once per node (rbee_tui/hive/setup.py): llama-server, ggml-rpc-server, llama-bench and
the shared libraries (libllama, libggml*) land in <cache>/<version>-<flavour>/bin. scripts/install.sh installs
llama-cpp-python without compiling its own copy (`-DLLAMA_BUILD=OFF`); the embedded engine then loads libllama
from that bin dir through llama-cpp-python's `LLAMA_CPP_LIB_PATH`. A llama-cpp-python that carries its own
library (a plain `pip install`) is left alone. Only the standard library: this runs at every start.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

LIB = "libllama.dylib" if sys.platform == "darwin" else "libllama.so"
# ggml backends that put a GPU runtime in the process (each its own library in a shared build).
GPU_BACKENDS = ("cuda", "hip", "metal", "vulkan", "sycl", "musa", "opencl", "cann")


def build_cache() -> Path:
    """Where the builds live: $RBEE_LLAMA_CPP_CACHE, else ~/.cache/rbee/llama.cpp."""
    return Path(os.environ.get("RBEE_LLAMA_CPP_CACHE") or Path.home() / ".cache/rbee/llama.cpp").expanduser()


def flavour(cmake_args: str) -> str:
    """A short hash of the CMake arguments ("cpu" when none): CPU and CUDA builds of a version differ."""
    return hashlib.md5(((cmake_args or "cpu") + "\n").encode()).hexdigest()[:8]


def cached(names: tuple[str, ...]) -> str | None:
    """The newest build's executable of one of `names`, or None."""
    found = [p for name in names for p in glob.glob(str(build_cache() / "*" / "bin" / name))]
    found = [p for p in found if os.access(p, os.X_OK)]
    return max(found, key=lambda p: os.path.getmtime(Path(p).parent)) if found else None


def lib_dir(version: str) -> Path | None:
    """The bin dir of a build of `version` that has libllama: the flavour $CMAKE_ARGS names when it is set,
    else the newest (the one the last install built)."""
    if os.environ.get("CMAKE_ARGS"):
        preferred = build_cache() / f"{version}-{flavour(os.environ['CMAKE_ARGS'])}" / "bin"
        if (preferred / LIB).is_file():
            return preferred
    found = [Path(p).parent for p in glob.glob(str(build_cache() / f"{version}-*" / "bin" / LIB))]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def point_llama_cpp_at_build() -> None:
    """Set LLAMA_CPP_LIB_PATH for llama-cpp-python when it has no library of its own and a build has one.

    Cheap when there is nothing to do (one lookup and one stat); never imports llama_cpp itself.
    """
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return
    if spec is None or not spec.submodule_search_locations:
        return
    if any((Path(p) / "lib" / LIB).is_file() for p in spec.submodule_search_locations):
        return
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return
    found = lib_dir(version)
    if found is not None:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(found)


def gpu_offload(llama_cpp: Any) -> bool:
    """Whether the loaded llama.cpp can put layers on a GPU. Its own `llama_supports_gpu_offload` also says yes
    for a build with the RPC backend (every node's build: rbee_tui/hive/setup.py), which needs no GPU and starts
    no GPU runtime; such a build offloads to a GPU only with a GPU backend's library beside libllama."""
    if not llama_cpp.llama_supports_gpu_offload():
        return False
    if not llama_cpp.llama_supports_rpc():
        return True
    lib = Path(getattr(llama_cpp.llama_cpp._lib, "_name", "") or ".").parent
    return any(any(lib.glob(f"libggml-{name}.*")) for name in GPU_BACKENDS)
