"""rbee-tui in a real terminal (tmux): it draws, answers keys, and quits restoring the terminal."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(
    TMUX is None or not (BIN / "rbee-tui").exists(),
    reason="needs tmux and an installed rbee-tui (bash scripts/install.sh --test)",
)


def capture(session: str) -> str:
    return subprocess.run([TMUX, "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout


def wait_screen(session: str, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        screen = capture(session)
        if text in screen:
            return screen
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared; the screen was:\n{capture(session)}")


@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=["120x40", "80x24"])
def test_real_terminal(size: tuple[int, int], isolated_home: Path) -> None:
    session = f"rbee-test-{os.getpid()}-{size[0]}"
    env = " ".join(f"{k}={os.environ[k]}" for k in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"))
    cmd = f"env {env} {BIN / 'rbee-tui'}; echo rbee-exit=$?; sleep 60"
    subprocess.run([TMUX, "new-session", "-d", "-s", session, "-x", str(size[0]), "-y", str(size[1]), cmd], check=True)
    try:
        screen = wait_screen(session, "tiny-test")
        lines = screen.splitlines()
        assert len(lines) <= size[1] and all(len(line) <= size[0] for line in lines)
        assert "Catalog" in screen and "Quit" in screen
        subprocess.run([TMUX, "send-keys", "-t", session, "4"], check=True)
        wait_screen(session, "RAM")
        subprocess.run([TMUX, "send-keys", "-t", session, "?"], check=True)
        wait_screen(session, "Key")
        subprocess.run([TMUX, "send-keys", "-t", session, "Escape"], check=True)
        time.sleep(0.3)
        subprocess.run([TMUX, "send-keys", "-t", session, "q"], check=True)
        after = wait_screen(session, "rbee-exit=0")
        assert "Catalog" not in after, "the alternate screen was left behind"
    finally:
        subprocess.run([TMUX, "kill-session", "-t", session], capture_output=True)
