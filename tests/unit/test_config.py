"""Config: the default with no file, round trips, overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee_tui import config
from rbee_tui.errors import CorruptFileError, RbeeError

WORKSTATION = """
[[pools]]
name = "workstation"
transport = "ssh"            # or "local"
host = "workstation.home.arpa"
port = 22
user = "rbee"
identity_file = "~/.ssh/id_ed25519"
backends = ["cuda"]
gpus = 1
models_dir = "~/.local/share/rbee/models"
"""


def test_no_config_means_one_local_pool(isolated_home: Path) -> None:
    cfg = config.load()
    assert [p.name for p in cfg.pools] == ["local"]
    assert cfg.pools[0].transport == "local"
    assert cfg.pools[0].backends == ("cpu",)
    assert cfg.path == isolated_home / "config" / "rbee" / "config.toml"
    assert not cfg.path.exists()


def test_issue_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(WORKSTATION)
    cfg = config.load(path)
    ws = cfg.pool("workstation")
    assert (ws.transport, ws.host, ws.port, ws.user, ws.gpus) == (
        "ssh",
        "workstation.home.arpa",
        22,
        "rbee",
        1,
    )
    assert ws.backends == ("cuda",)
    assert ws.identity_file == "~/.ssh/id_ed25519"


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(WORKSTATION)
    cfg = config.load(path)
    cfg = cfg.with_pool(config.PoolConfig(name="mac", transport="ssh", host="mac.home.arpa", backends=("metal",)))
    out = tmp_path / "out.toml"
    config.save(cfg, out)
    again = config.load(out)
    assert again.pools == cfg.pools
    assert again.registry == cfg.registry
    assert again.theme == cfg.theme


def test_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "elsewhere.toml"
    path.write_text(WORKSTATION)
    monkeypatch.setenv("RBEE_CONFIG", str(path))
    assert config.config_path() == path
    assert config.load().pools[0].name == "workstation"
    # --config wins over the environment
    other = tmp_path / "other.toml"
    other.write_text('[[pools]]\nname = "box"\n')
    assert config.load(other).pools[0].name == "box"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[[pools]]\nname = "a"\ntransport = "telnet"\n', "transport must be 'local' or 'ssh'"),
        ('[[pools]]\nname = "a"\ntransport = "ssh"\n', "an ssh pool needs a host"),
        ('[[pools]]\nname = "a"\ntransport = "ssh"\nhost = "x; rm -rf /"\n', "invalid host name"),
        ('[[pools]]\nname = "a b"\n', "invalid pool name"),
        ('[[pools]]\nname = "a"\nbackends = ["rocm"]\n', "unknown backend"),
        ('[[pools]]\nname = "a"\nport = 70000\n', "port must be an integer"),
        ('[[pools]]\nname = "a"\ncolour = 1\n', "unknown key(s) colour"),
        ('[[pools]]\nname = "a"\n[[pools]]\nname = "a"\n', "used twice"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(body)
    with pytest.raises(RbeeError) as err:
        config.load(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_corrupt_config_is_reported_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b"[[pools]\nname = ")
    with pytest.raises(CorruptFileError) as err:
        config.load(path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == b"[[pools]\nname = "


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RbeeError, match="does not exist"):
        config.load(tmp_path / "nope.toml")
