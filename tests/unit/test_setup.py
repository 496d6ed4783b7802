"""`rbee-hive setup`: a cached build is found and reported, a build streams its steps and cmake's percentages,
a head's other build is refused naming both, and it runs over SSH through `rbee-tui pool NAME setup`.

The build path runs the real procedure (cmake configure, build, install) on a small stand-in for the llama.cpp
tree, with the same targets, so the suite never compiles llama.cpp itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from rbee_tui.config import Config, PoolConfig
from rbee_tui.hive import rpc, setup
from tests.conftest import REPO_ROOT, hive_cmd
from tests.support.hub import HubServer
from tests.support.site import Site
from tests.support.sshd import sshd_available

VERSION = "9.9.9"
BUILD = setup.build_name(VERSION, "")


def _tree(src: Path, broken: bool = False) -> None:
    """A llama.cpp stand-in: the three tools, the RPC one named in tools/rpc as llama.cpp names it, and the shared
    `llama` library that llama-server links (so the installed server runs only if it finds it beside itself)."""
    (src / "tools" / "rpc").mkdir(parents=True)
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.14)\nproject(standin C)\n"
        "set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)\n"
        "set(CMAKE_LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)\n"
        "add_library(llama lib.c)\nadd_executable(llama-server server.c)\ntarget_link_libraries(llama-server llama)\n"
        "add_executable(llama-bench tool.c)\nadd_subdirectory(tools/rpc)\n"
    )
    (src / "lib.c").write_text('const char *standin_version(void) { return "4242 (standin)"; }\n')
    (src / "tools" / "rpc" / "CMakeLists.txt").write_text(
        "set(TARGET ggml-rpc-server)\nadd_executable(${TARGET} ../../tool.c)\n"
    )
    (src / "server.c").write_text(
        "#include <stdio.h>\nconst char *standin_version(void);\n"
        'int main(void) { printf("version: %s\\n", standin_version()); return 0; }\n'
    )
    (src / "tool.c").write_text("int main(void) { return 0; }\n" + ("this is not C;\n" if broken else ""))


def _setup(cache: Path, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    env = {**os.environ, "RBEE_LLAMA_CPP_CACHE": str(cache)}
    env.pop("CMAKE_ARGS", None)
    proc = subprocess.run(
        hive_cmd("setup", "--json", *args), capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT
    )
    return proc.returncode, [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()], proc.stderr


needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("cc") is None, reason="no cmake or cc")


@needs_cmake
def test_a_build_streams_its_steps_then_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    _tree(cache / BUILD / "src")
    rc, events, err = _setup(cache, "--version", VERSION)
    assert rc == 0, err
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == ["configure", "build", "install"], events
    percents = [e["percent"] for e in events if e["event"] == "progress" and e["step"] == "build"]
    assert percents and percents == sorted(percents) and percents[-1] == 100, events
    done = events[-1]
    assert done["event"] == "done" and not done["cached"] and done["build"] == BUILD
    bin_dir = Path(done["bin"])
    assert bin_dir == cache / BUILD / "bin"
    assert (bin_dir / "BUILD_COMMIT").read_text().strip() == "4242 (standin)"  # the server ran, its library found
    assert (bin_dir / "libllama.so").is_file()  # beside the tools, for llama-cpp-python (rbee_tui/llama_build.py)
    assert os.readlink(bin_dir / "rpc-server") == "ggml-rpc-server"  # the old name, for older callers
    # What `rbee-hive rpc` reports and compares between nodes is the name this build got.
    monkeypatch.setenv("RBEE_LLAMA_CPP_CACHE", str(cache))
    assert rpc.build_cache() == setup.build_cache()
    assert rpc.build_of(str(bin_dir / "ggml-rpc-server")) == BUILD

    rc, events, err = _setup(cache, "--version", VERSION, "--expect", BUILD)
    assert rc == 0, err
    assert events == [{"event": "done", "build": BUILD, "bin": str(bin_dir), "cached": True, "seconds": 0.0}]


@needs_cmake
def test_a_failed_build_says_which_step_and_its_last_line(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _tree(cache / BUILD / "src", broken=True)
    rc, events, err = _setup(cache, "--version", VERSION)
    assert rc == 1
    assert events[-1]["event"] == "error" and events[-1]["error"].startswith("build failed (cmake exited"), events
    assert "error:" in err and not (cache / BUILD / "bin").exists()


def test_another_build_on_the_head_is_refused_naming_both(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    rc, events, _ = _setup(cache, "--version", VERSION, "--expect", "9.9.8-d0fc6ee6")
    assert rc == 1
    assert events == [
        {
            "event": "error",
            "error": f"the head runs llama.cpp build 9.9.8-d0fc6ee6, this node's llama-cpp-python {VERSION} vendors "
            f"build {BUILD}: RPC needs the same build on every node",
            "hint": "install llama-cpp-python==9.9.8 on this node, then run setup again",
        }
    ]
    rc, events, _ = _setup(cache, "--version", VERSION, "--expect", f"{VERSION}-0badf00d")
    assert rc == 1 and "same version, other CMAKE_ARGS" in events[-1]["error"]
    assert not cache.exists()  # refused before anything was made


def test_no_cmake_is_said_plainly(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path), "RBEE_LLAMA_CPP_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "rbee_tui.hive.setup", VERSION],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "build-llama-cpp: error: cmake is needed to build llama.cpp on this node "
        "(apt-get install cmake build-essential)"
    )


def test_the_script_is_the_same_command() -> None:
    """scripts/build-llama-cpp.sh runs this module: one procedure, whichever way it is started."""
    text = (REPO_ROOT / "scripts" / "build-llama-cpp.sh").read_text()
    assert 'exec "$PY" -m rbee_tui.hive.setup "$@"' in text
    assert "cmake" not in text.split("set -euo pipefail", 1)[1]


@pytest.mark.skipif(sshd_available() is not None, reason=str(sshd_available()))
@pytest.mark.skipif(not list(setup.build_cache().glob("*/bin/BUILD_COMMIT")), reason="llama.cpp's tools not built")
def test_over_ssh_a_cached_build_is_reported(tmp_path: Path) -> None:
    hub = HubServer().start()
    site = Site(tmp_path, hub)
    try:
        cfg = tmp_path / "config.toml"
        cfg.write_text(tomli_w.dumps(Config(pools=(PoolConfig(name="local"), site.pools["pool-a"])).to_toml()))
        mine = setup.build_name(setup.installed_version(), "")
        cmd = [sys.executable, "-m", "rbee_tui.cli", "--config", str(cfg), "pool", "pool-a", "setup", "--json"]
        proc = subprocess.run([*cmd, "--expect", mine], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        done = json.loads(proc.stdout.splitlines()[-1])
        assert done["event"] == "done" and done["cached"] and done["build"] == mine
        assert Path(done["bin"], "llama-server").exists()
    finally:
        site.stop()
        hub.stop()
