"""Shared fixtures: an isolated home for every test, the hub stand-in, generated models, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rbee_tui.tinymodel import TinySpec, write_model
from tests.support.cleanup import kill_workers
from tests.support.hub import HubServer

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own XDG dirs, so nothing touches the real user's config or models."""
    home = tmp_path / "home"
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"), ("XDG_STATE_HOME", "state")):
        (home / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.delenv("RBEE_CONFIG", raising=False)
    monkeypatch.delenv("RBEE_MODELS_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    yield home
    kill_workers(home)


@pytest.fixture
def models_dir(isolated_home: Path) -> Path:
    return isolated_home / "data" / "rbee" / "models"


@pytest.fixture(scope="session")
def medium_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated model of a few MB: big enough for a transfer to be watched, cut and resumed."""
    path = tmp_path_factory.mktemp("models") / "medium.gguf"
    return write_model(path, TinySpec(name="rbee medium", n_embd=256, n_ff=768, n_layer=2, seed=7))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    server = HubServer().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()


def hive_cmd(*args: str) -> list[str]:
    script = BIN / "rbee-hive"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "rbee_tui.hive.cli", *args]  # not installed: run from the source tree


@pytest.fixture
def hive() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `rbee-hive ARGS` as a user would, in the test's environment."""

    def run(*args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(hive_cmd(*args), capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        if check and proc.returncode != 0:
            raise AssertionError(f"rbee-hive {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    return run


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def wait_for(predicate: Callable[[], object], timeout: float = 30, interval: float = 0.02, what: str = "") -> object:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
