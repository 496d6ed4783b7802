"""rbee-tui installs as an app: the wheel carries every module and the themes, runs from where it is
installed, and everything the code imports is a declared dependency."""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

import rbee_tui

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "rbee_tui"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Top-level names of this repository's own code: imported from the checkout, never from a distribution.
LOCAL = {"rbee_tui", "tests", "bench", "fixtures", "scripts"}
# Recorded in a subprocess: the top-level modules that code in rbee_tui asks for while `argv[1]` is imported.
IMPORT_PROBE = """
import builtins, importlib, json, sys
seen = set()
real = builtins.__import__
def probe(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and str((globals or {}).get("__name__", "")).startswith("rbee_tui"):
        seen.add(name.partition(".")[0])
    return real(name, globals, locals, fromlist, level)
builtins.__import__ = probe
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(seen)))
"""


def _dist_name(requirement: str) -> str:
    """The normalized distribution name of a requirement string such as `httpx2>=2.0,<3`."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match, f"unreadable requirement {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


RUNTIME = {_dist_name(r) for r in PYPROJECT["project"]["dependencies"]}
TEST_EXTRA = {_dist_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["test"]}


def _undeclared(modules: set[str], declared: set[str]) -> list[str]:
    """`modules` (top-level import names) that no declared distribution provides, each with who does."""
    providers = packages_distributions()
    out = []
    for module in sorted(modules - LOCAL - set(sys.stdlib_module_names) - {"__future__"}):
        dists = {_dist_name(d) for d in providers.get(module, [])}
        if not dists & declared:
            out.append(f"{module} (from {', '.join(sorted(dists)) or 'no installed distribution'})")
    return out


def _static_imports(paths: list[Path]) -> set[str]:
    """Every absolute import in `paths`, also those inside functions (lazy imports run only when called)."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.partition(".")[0])
    return names


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built offline from a copy of what a clone holds (the checkout stays clean)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    # symlinks=True: rbee_tui/themes_data must stay a (relative) link to the copied themes/, as in a clone.
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "rbee_tui", src / "rbee_tui", symlinks=True, ignore=skip)
    shutil.copytree(ROOT / "themes", src / "themes", ignore=skip)
    out = base / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    done = subprocess.run([*cmd, "-w", str(out), str(src)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("rbee_tui-*.whl")
    return built


def test_the_wheel_carries_the_themes_as_real_files(wheel: Path) -> None:
    tcss = sorted((ROOT / "themes").glob("*.tcss"))
    assert {p.name for p in tcss} >= {"rbee.tcss", "rbee-dark.tcss", "rbee-light.tcss"}
    with zipfile.ZipFile(wheel) as zf:
        for path in tcss:
            assert zf.read(f"rbee_tui/themes_data/{path.name}") == path.read_bytes(), path.name


def test_the_wheel_carries_every_module_and_entry_point(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = zf.read("rbee_tui-0.1.0.dist-info/entry_points.txt").decode()
    expected = {p.relative_to(ROOT).as_posix() for p in _sources(PKG)} | {"rbee_tui/py.typed"}
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    for script, target in PYPROJECT["project"]["scripts"].items():
        assert f"{script} = {target}" in entry_points


def test_an_installed_wheel_opens_the_dashboard_with_its_themes(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    # The installed copy comes first on the path; -P and a neutral cwd keep the checkout out of sight.
    script = """
import asyncio, rbee_tui
from rbee_tui.app import RbeeApp
from rbee_tui.config import Config, PoolConfig
from rbee_tui.themes import stylesheets

async def main():
    app = RbeeApp(Config(pools=(PoolConfig(name="local", models_dir="models"),)), autostart=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert app.theme == "rbee-dark", app.theme
    print(rbee_tui.__file__)
    print("\\n".join(str(p) for p in stylesheets()))

asyncio.run(main())
"""
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-P", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    package, *sheets = done.stdout.split()
    assert Path(package).is_relative_to(site)
    assert len(sheets) == 3
    for sheet in map(Path, sheets):
        assert sheet.is_relative_to(site) and sheet.is_file(), sheet


def test_the_checkout_reads_the_top_level_themes() -> None:
    from rbee_tui.themes import stylesheets

    for sheet in stylesheets():
        assert sheet.resolve() == (ROOT / "themes" / sheet.name).resolve()


def _modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(rbee_tui.__path__, "rbee_tui.")]


def test_every_module_imports_with_only_declared_dependencies(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's rbee_tui, whatever is installed

    def probe(module: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        cmd = [sys.executable, "-P", "-c", IMPORT_PROBE, module]
        return module, subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    modules = _modules()
    assert len(modules) > 30 and "rbee_tui.hive.downloads" in modules
    # Each in a fresh interpreter: one module's imports must not hide another's missing one.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(probe, modules))
    failed = [f"{m}: {r.stderr.strip().splitlines()[-1:]}" for m, r in results if r.returncode != 0]
    assert not failed, failed
    imported = set().union(*(json.loads(r.stdout) for _, r in results))
    assert "textual" in imported
    assert not _undeclared(imported, RUNTIME), "imported but not in [project].dependencies"


def test_every_import_in_the_code_is_declared() -> None:
    imported = _static_imports(_sources(PKG))
    assert {"httpx2", "textual"} <= imported
    assert not _undeclared(imported, RUNTIME), "imported but not in [project].dependencies"


def test_every_import_in_the_tests_is_declared() -> None:
    imported = _static_imports(_sources(ROOT / "tests"))
    assert "pytest" in imported
    assert not _undeclared(imported, RUNTIME | TEST_EXTRA), "imported by tests but in no declared extra"


def test_the_check_names_an_undeclared_module() -> None:
    assert _undeclared({"httpx2", "json", "rbee_tui"}, {"textual"}) == ["httpx2 (from httpx2)"]
    assert _undeclared({"surely_not_installed"}, RUNTIME) == ["surely_not_installed (from no installed distribution)"]
