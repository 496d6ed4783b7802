"""`rbee-tui config show|init` and config warnings, as a user runs them."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from rbee_tui import config
from rbee_tui.cli import main
from tests.unit.test_config import FULL


def test_show_names_the_file_and_prints_the_matrix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(FULL)
    assert main(["--config", str(path), "config", "show"]) == 0
    out, err = capsys.readouterr()
    first, body = out.split("\n", 1)
    assert first == f"# read from {path}"
    shown = tomllib.loads(body)
    assert shown["matrix"] == {
        "models": ["tiny-test", "qwen-0.5b"],
        "pools": ["local", "workstation"],
        "max_tokens": 32,
    }
    assert shown["pools"][1]["hive_command"] == "/opt/rbee/bin/rbee-hive"
    # The unknown keys are not shown as if in force; they are warned about, one line each, on stderr.
    assert "rack" not in body and "favourite_colour" not in body
    warnings = err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("rbee-tui: warning: ") for w in warnings)
    assert "favourite_colour" in warnings[0] and "rack" in warnings[1]


def test_show_without_a_file_says_these_are_the_defaults(
    isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "show"]) == 0
    out, err = capsys.readouterr()
    path = isolated_home / "config" / "rbee" / "config.toml"
    assert out.splitlines()[0] == f"# no config file at {path}: these are the defaults"
    shown = tomllib.loads(out)
    assert [p["name"] for p in shown["pools"]] == ["local"] and shown["matrix"]["max_tokens"] == 16
    assert err == "" and not path.exists()


def test_init_writes_the_defaults_once(isolated_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = isolated_home / "config" / "rbee" / "config.toml"
    assert main(["config", "init"]) == 0
    assert config.load() == config.load(path) and config.load().pools[0].name == "local"
    before = path.read_bytes()
    assert main(["config", "init"]) == 1
    assert "already exists" in capsys.readouterr().err and path.read_bytes() == before


def test_a_bad_value_is_one_line_and_no_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[matrix]\nmax_tokens = -1\n")
    assert main(["--config", str(path), "config", "show"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rbee-tui: error: ") and "matrix.max_tokens" in err
