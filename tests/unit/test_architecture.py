"""Node-side and service code (the Fleet and the job board included) never imports the UI: checked by walking
every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "rbee_tui"
NODE_SIDE = [
    "hive",
    "worker",
    "pools",
    "matrix",
    "cluster",
    "gateway",
    "fleet.py",
    "units.py",
    "catalog.py",
    "config.py",
    "files.py",
    "registry.py",
    "tinymodel.py",
    "names.py",
    "errors.py",
    "sample.py",
    "capacity_cli.py",
    "capacity.py",
]
FORBIDDEN = ("textual", "rbee_tui.ui", "rbee_tui.app")


def _modules() -> list[Path]:
    out: list[Path] = []
    for name in NODE_SIDE:
        path = PKG / name
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
    return out


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_no_ui_imports(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"
