"""`rbee-hive setup`: llama.cpp's own tools (llama-server, ggml-rpc-server, llama-bench) on this node, built
from the llama.cpp that its llama-cpp-python vendors, so every node of a cluster runs the same build.

The one build procedure: scripts/build-llama-cpp.sh runs this module. The tools land in
${RBEE_LLAMA_CPP_CACHE:-~/.cache/rbee/llama.cpp}/<version>-<flavour>/bin, where the flavour is a hash of
CMAKE_ARGS ("cpu" when unset); that directory name is the build `rbee-hive rpc` reports and compares, so a
build is done once per version and flavour, and `--expect BUILD` (the head's) refuses at once a node whose
llama-cpp-python would build something else. Only the standard library here: the script may run it before
the virtualenv has anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rbee_tui.errors import RbeeError
from rbee_tui.llama_build import LIB, build_cache, flavour

TOOLS = ("llama-server", "llama-bench")  # with the RPC server, whose name depends on the llama.cpp version
_PERCENT = re.compile(r"^\[\s*(\d+)%\]")
Progress = Callable[[dict[str, Any]], None]


def installed_version() -> str:
    """The llama-cpp-python version installed beside this rbee-hive."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise RbeeError(
            "llama-cpp-python is not installed on this node: its version says which llama.cpp to build",
            "install rbee-tui on the node first (scripts/install.sh)",
        ) from None


def build_name(version: str, cmake_args: str) -> str:
    """The build's name: `<version>-<flavour>` (e.g. 0.3.36-d0fc6ee6)."""
    return f"{version}-{flavour(cmake_args)}"


def complete(bin_dir: Path) -> bool:
    """Whether a build's bin dir has every tool, the library llama-cpp-python loads, and its BUILD_COMMIT."""
    return (
        all(os.access(bin_dir / t, os.X_OK) for t in TOOLS)
        and (bin_dir / LIB).is_file()
        and any(os.access(bin_dir / n, os.X_OK) for n in ("ggml-rpc-server", "rpc-server"))
        and (bin_dir / "BUILD_COMMIT").is_file()
    )


def check_expected(expect: str | None, build: str) -> None:
    """Refuse when the head's build is not the one this node would build, naming both and what to change."""
    if not expect or expect == build:
        return
    theirs, _, their_flavour = expect.rpartition("-")
    mine, _, my_flavour = build.rpartition("-")
    if theirs != mine:
        raise RbeeError(
            f"the head runs llama.cpp build {expect}, this node's llama-cpp-python {mine} vendors build {build}: "
            "RPC needs the same build on every node",
            f"install llama-cpp-python=={theirs} on this node, then run setup again",
        )
    raise RbeeError(
        f"the head runs llama.cpp build {expect}, this node would build {build}: same version, other CMAKE_ARGS "
        f"(flavour {their_flavour} vs {my_flavour})",
        "run setup with the CMAKE_ARGS the head was built with",
    )


def _run(
    cmd: list[str], step: str, progress: Progress, cwd: Path | None = None, scale: tuple[int, int] = (0, 1)
) -> None:
    """Run a build step, streaming its lines as progress; cmake's percentages are of part `scale[0]` of
    `scale[1]` (one target of several), so the percent reported goes from 0 to 100 once over all of them."""
    tail: list[str] = []
    last_pct = -1
    try:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except OSError as exc:
        raise RbeeError(f"{step}: cannot run {cmd[0]}: {exc.strerror or exc}") from None
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = [*tail[-19:], line]
        m = _PERCENT.match(line)
        pct = (scale[0] * 100 + int(m.group(1))) // scale[1] if m else None
        if pct is not None and pct != last_pct:
            last_pct = pct
            progress({"event": "progress", "step": step, "percent": pct, "line": line})
        elif pct is None and line:
            progress({"event": "log", "step": step, "line": line})
    if proc.wait() != 0:
        last = next((ln for ln in reversed(tail) if ln.strip()), "no output")
        raise RbeeError(f"{step} failed ({cmd[0]} exited {proc.returncode}): {last}", "see the lines above it")


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rbee-setup-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fetch_sources(version: str, dest: Path, progress: Progress) -> None:
    """llama-cpp-python's source distribution of `version`, its vendor/llama.cpp moved to `dest`."""
    progress({"event": "step", "step": "fetch", "message": f"fetching the llama-cpp-python {version} sources"})
    with _scratch() as dl:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(dl)]
        _run([*pip, f"llama-cpp-python=={version}"], "fetch", progress)
        archive = next(dl.glob("llama_cpp_python-*.tar.gz"), None)
        if archive is None:
            raise RbeeError(f"fetch: pip gave no llama-cpp-python {version} source archive")
        with tarfile.open(archive) as tar:
            tar.extractall(dl, filter="data")
        vendored = next(dl.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
        if vendored is None:
            raise RbeeError(f"fetch: the llama-cpp-python {version} sources vendor no llama.cpp")
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.move(str(vendored), tmp)
        tmp.rename(dest)


def rpc_target(src: Path) -> str:
    """The RPC server's CMake target: ggml-rpc-server in newer llama.cpp, rpc-server in older."""
    with contextlib.suppress(OSError):
        m = re.search(r"^set\(TARGET (\S*rpc-server)\)", (src / "tools/rpc/CMakeLists.txt").read_text(), re.M)
        if m:
            return m.group(1)
    return "rpc-server"


def setup(
    version: str | None = None,
    cmake_args: str | None = None,
    expect: str | None = None,
    progress: Progress | None = None,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Build (or find cached) llama.cpp's tools for `version` (default: the installed llama-cpp-python's);
    returns {"build", "bin", "cached", "seconds"}. Refuses when `expect` (the head's build) differs."""
    say = progress or (lambda ev: None)
    t0 = time.monotonic()
    version = version or installed_version()
    cmake_args = os.environ.get("CMAKE_ARGS", "") if cmake_args is None else cmake_args
    build = build_name(version, cmake_args)
    check_expected(expect, build)
    cache = build_cache() / build
    bin_dir = cache / "bin"
    if complete(bin_dir):
        return {"event": "done", "build": build, "bin": str(bin_dir), "cached": True, "seconds": 0.0}
    if shutil.which("cmake") is None:
        raise RbeeError("cmake is needed to build llama.cpp on this node", "apt-get install cmake build-essential")
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / "src"  # sources and build tree stay in the cache: an interrupted build picks up where it stopped
    if not src.is_dir():
        fetch_sources(version, src, say)
    rpc = rpc_target(src)
    targets = ["llama-server", rpc, "llama-bench", "llama"]  # `llama`: libllama, for llama-cpp-python
    say({"event": "step", "step": "configure", "message": f"configuring {', '.join(targets)} ({build})"})
    _run(
        [
            "cmake",
            "-S",
            str(src),
            "-B",
            str(cache / "build"),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_RPC=ON",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            # Shared libraries, found beside the tools ($ORIGIN): llama-cpp-python loads the same libllama, so
            # llama.cpp is compiled once per node, not once more by pip (scripts/install.sh).
            "-DBUILD_SHARED_LIBS=ON",
            "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
            "-DCMAKE_INSTALL_RPATH=$ORIGIN",
            *shlex.split(cmake_args),
        ],
        "configure",
        say,
    )
    n = jobs or os.cpu_count() or 1
    say({"event": "step", "step": "build", "message": f"building with {n} jobs (minutes on a small machine)"})
    for i, target in enumerate(targets):  # one at a time: cmake's percentages restart with each target
        build_cmd = ["cmake", "--build", str(cache / "build"), "--config", "Release", "-j", str(n), "--target", target]
        _run(build_cmd, "build", say, scale=(i, len(targets)))
    say({"event": "step", "step": "install", "message": f"installing into {bin_dir}"})
    tmp = cache / "bin.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in targets[:-1]:
        shutil.copy2(cache / "build" / "bin" / name, tmp / name)
    libs = [*(cache / "build" / "bin").glob("*.so*"), *(cache / "build" / "bin").glob("*.dylib")]
    for lib in libs:  # libllama, libggml*, libmtmd and their version links
        shutil.copy2(lib, tmp / lib.name, follow_symlinks=False)
    if rpc != "rpc-server":
        (tmp / "rpc-server").symlink_to(rpc)
    out = subprocess.run([str(tmp / "llama-server"), "--version"], capture_output=True, text=True, timeout=60)
    commit = next(
        (ln.split(":", 1)[1].strip() for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version:")), ""
    )
    (tmp / "BUILD_COMMIT").write_text(commit + "\n")
    shutil.rmtree(bin_dir, ignore_errors=True)
    tmp.rename(bin_dir)
    seconds = round(time.monotonic() - t0, 1)
    return {"event": "done", "build": build, "bin": str(bin_dir), "cached": False, "seconds": seconds}


def run(version: str | None, cmake_args: str | None, expect: str | None, as_json: bool, quiet: bool = False) -> int:
    """The command: progress on stderr (or JSON lines on stdout with `as_json`), the bin dir last."""
    if as_json:

        def say(ev: dict[str, Any]) -> None:
            if ev["event"] != "log":  # the compiler's lines stay in the plain output: the events carry the steps
                print(json.dumps(ev), flush=True)

    else:

        def say(ev: dict[str, Any]) -> None:
            if not quiet:
                sys.stderr.write((ev.get("message") or ev.get("line") or "") + "\n")
                sys.stderr.flush()

    result = setup(version, cmake_args, expect, say)
    if as_json:
        print(json.dumps(result), flush=True)
    else:
        if not quiet:
            how = "cached" if result["cached"] else f"built in {result['seconds']:.0f} s"
            sys.stderr.write(f"llama.cpp build {result['build']}: {how}\n")
        print(result["bin"], flush=True)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's options (shared by `rbee-hive setup` and `python -m rbee_tui.hive.setup`)."""
    p.add_argument("--version", dest="llama_version", help="llama-cpp-python version (default: the installed one)")
    p.add_argument("--cmake-args", help="CMake arguments, e.g. -DGGML_CUDA=ON (default: $CMAKE_ARGS; none: CPU)")
    p.add_argument("--expect", metavar="BUILD", help="the head's build: refuse to build anything else")


def main(argv: list[str] | None = None) -> int:
    """`python -m rbee_tui.hive.setup [VERSION]`: what scripts/build-llama-cpp.sh runs."""
    ap = argparse.ArgumentParser(prog="build-llama-cpp", description=__doc__.splitlines()[0])
    ap.add_argument("version", nargs="?", help="llama-cpp-python version (default: the installed one)")
    add_arguments(ap)
    ap.add_argument("--json", action="store_true", help="progress as JSON lines")
    args = ap.parse_args(argv)
    try:
        return run(args.version or args.llama_version, args.cmake_args, args.expect, args.json)
    except RbeeError as exc:
        if args.json:
            print(json.dumps({"event": "error", **exc.to_json()}), flush=True)
        sys.stderr.write(f"build-llama-cpp: error: {exc}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
