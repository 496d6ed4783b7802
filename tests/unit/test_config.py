"""Config: the default with no file, round trips, overrides, and clear errors."""

from __future__ import annotations

from dataclasses import replace
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
    assert (ws.transport, ws.host, ws.port, ws.user) == ("ssh", "workstation.home.arpa", 22, "rbee")
    assert ws.backends == ("cuda",)
    assert ws.identity_file == "~/.ssh/id_ed25519"
    # Older files have a `gpus` key that nothing reads (a node reports its GPUs itself): it loads, with a warning.
    (warning,) = cfg.warnings
    assert "pools[0] (workstation): unknown key(s) gpus ignored" in warning


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
        ('[[pools]]\nname = "a"\nport = true\n', "port must be an integer"),
        ('[[pools]]\nname = "a"\nmodels_dir = 3\n', "models_dir must be a non-empty string"),
        ('[matrix]\nmodels = "tiny-test"\n', "matrix.models must be a list of model ids"),
        ('[matrix]\nmodels = ["../up"]\n', "matrix.models: invalid model id"),
        ('[matrix]\npools = ["nope"]\n', "matrix.pools names no pool 'nope'"),
        ("[matrix]\nmax_tokens = 0\n", "matrix.max_tokens must be an integer"),
        ("matrix = 3\n", "matrix must be a table"),
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


# Every documented key, the user's comments, and keys rbee-tui does not know: a save must keep them all.
FULL = """\
# My lab. Do not lose this comment.
theme = "rbee-dark"   # the default
favourite_colour = "teal"   # not a key rbee-tui knows

[registry]
endpoint = "https://huggingface.co"      # HF_ENDPOINT overrides it

[[registry.models]]
id = "my-model"
repo = "me/my-model-GGUF"
file = "my-model.Q4_K_M.gguf"

[[pools]]
name = "local"
transport = "local"
backends = ["cpu"]
models_dir = "/srv/models"    # the fast disk

# The GPU box under the desk.
[[pools]]
name = "workstation"
transport = "ssh"            # or "local"
host = "workstation.home.arpa"
port = 22
user = "rbee"
identity_file = "~/.ssh/id_ed25519"
backends = ["cuda"]
gpus = 1
hive_command = "/opt/rbee/bin/rbee-hive"
llama_server = "/opt/llama.cpp/llama-server"
known_hosts = "~/.ssh/lab_known_hosts"
rack = "B2"                  # mine, not rbee-tui's

[matrix]
models = ["tiny-test", "qwen-0.5b"]   # the usual suspects
pools = ["local", "workstation"]
max_tokens = 32
"""


@pytest.fixture
def full(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(FULL)
    return path


def form_pool(**values: object) -> config.PoolConfig:
    """A pool as the dashboard's form builds it: only the keys the form shows."""
    raw = {"name": "workstation", "transport": "ssh", "host": "workstation.home.arpa", "port": 22, "user": "rbee"}
    raw |= {"identity_file": "~/.ssh/id_ed25519", "backends": ["cuda"], **values}
    return config.parse({"pools": [raw]}, "form").pools[0]


def test_every_documented_key_is_read_and_unknown_keys_only_warn(full: Path) -> None:
    cfg = config.load(full)
    assert cfg.matrix == config.MatrixConfig(
        models=("tiny-test", "qwen-0.5b"), pools=("local", "workstation"), max_tokens=32
    )
    ws = cfg.pool("workstation")
    assert (ws.hive_command, ws.llama_server, ws.known_hosts) == (
        "/opt/rbee/bin/rbee-hive",
        "/opt/llama.cpp/llama-server",
        "~/.ssh/lab_known_hosts",
    )
    assert cfg.pool("local").models_dir == "/srv/models"
    assert cfg.registry.models[0]["id"] == "my-model"
    top, pool = cfg.warnings
    assert "favourite_colour" in top and "known: theme, registry, pools, matrix" in top and str(full) in top
    assert "pools[1] (workstation)" in pool and "gpus, rack" in pool and "known_hosts" in pool
    assert all("\n" not in w for w in cfg.warnings)


def test_an_ssh_pool_without_models_dir_leaves_it_to_the_node(tmp_path: Path) -> None:
    from rbee_tui.pools.transport import hive_args

    path = tmp_path / "c.toml"
    path.write_text(WORKSTATION.replace('models_dir = "~/.local/share/rbee/models"\n', ""))
    ws = config.load(path).pool("workstation")
    assert ws.models_dir is None
    assert "--models-dir" not in hive_args(ws, "models", "catalog")
    named = config.PoolConfig(name="ws", transport="ssh", host="ws", models_dir="/data/m")
    assert hive_args(named, "status")[:4] == ["--pool-id", "ws", "--models-dir", "/data/m"]
    # The local pool's node is this machine: its default is this machine's XDG data dir.
    assert hive_args(config.local_pool(), "status")[2:4] == ["--models-dir", config.default_models_dir()]


def test_set_theme_touches_only_the_theme(full: Path) -> None:
    cfg = config.set_theme(config.load(full), "rbee-light")
    assert full.read_text() == FULL.replace('theme = "rbee-dark"   #', 'theme = "rbee-light"   #')
    assert cfg.theme == "rbee-light" and cfg.path == full and config.load(full).theme == "rbee-light"


def test_add_pool_appends_one_entry_and_keeps_the_rest(full: Path) -> None:
    mac = config.PoolConfig(name="mac", transport="ssh", host="mac.home.arpa", backends=("metal",))
    cfg = config.add_pool(config.load(full), mac)
    entry = '[[pools]]\nname = "mac"\ntransport = "ssh"\nhost = "mac.home.arpa"\nport = 22\nbackends = ["metal"]\n'
    entry += "\n"
    assert full.read_text() == FULL.replace("[matrix]\n", entry + "[matrix]\n")
    assert cfg.pool("mac") == mac and [p.name for p in cfg.pools] == ["local", "workstation", "mac"]


def test_add_pool_refuses_a_name_in_use(full: Path) -> None:
    cfg = config.load(full)
    with pytest.raises(RbeeError, match="a pool named workstation exists"):
        config.add_pool(cfg, config.PoolConfig(name="workstation", transport="local"))
    # A name only the caller's config knows (the file changed meanwhile) is refused too.
    extra = cfg.with_pool(config.PoolConfig(name="mac", transport="ssh", host="mac.home.arpa"))
    with pytest.raises(RbeeError, match="a pool named mac exists"):
        config.add_pool(extra, config.PoolConfig(name="mac", transport="local"))
    assert full.read_text() == FULL


def test_update_pool_writes_only_what_changed_and_keeps_what_the_form_hides(full: Path) -> None:
    cfg = config.update_pool(config.load(full), "workstation", form_pool(host="ws2.home.arpa", port=2222))
    expected = FULL.replace('host = "workstation.home.arpa"', 'host = "ws2.home.arpa"').replace(
        "port = 22\n", "port = 2222\n"
    )
    assert full.read_text() == expected  # the old `gpus = 1` stays, like any key this tool does not know
    ws = cfg.pool("workstation")
    assert (ws.host, ws.port) == ("ws2.home.arpa", 2222)
    assert (ws.hive_command, ws.known_hosts, ws.llama_server) == (
        "/opt/rbee/bin/rbee-hive",
        "~/.ssh/lab_known_hosts",
        "/opt/llama.cpp/llama-server",
    )
    # Saving the form unchanged writes nothing at all.
    config.update_pool(cfg, "workstation", form_pool(host="ws2.home.arpa", port=2222))
    assert full.read_text() == expected


def test_update_pool_removes_a_key_the_user_cleared(full: Path) -> None:
    config.update_pool(config.load(full), "local", config.PoolConfig(name="local", transport="local"))
    assert full.read_text() == FULL.replace('models_dir = "/srv/models"    # the fast disk\n', "")


def test_update_pool_renames_and_the_default_matrix_follows(full: Path) -> None:
    cfg = config.load(full)
    with pytest.raises(RbeeError, match="a pool named local exists"):
        config.update_pool(cfg, "workstation", form_pool(name="local"))
    with pytest.raises(RbeeError, match="no pool named 'nope'"):
        config.update_pool(cfg, "nope", form_pool())
    assert full.read_text() == FULL
    cfg = config.update_pool(cfg, "workstation", form_pool(name="ws"))
    assert full.read_text() == FULL.replace('name = "workstation"', 'name = "ws"').replace(
        'pools = ["local", "workstation"]', 'pools = ["local", "ws"]'
    )
    assert cfg.matrix.pools == ("local", "ws") and cfg.pool("ws").hive_command == "/opt/rbee/bin/rbee-hive"


def test_saves_read_the_file_again_under_the_lock(full: Path) -> None:
    stale = config.load(full)
    full.write_text(FULL.replace("max_tokens = 32", "max_tokens = 64"))  # edited by hand meanwhile
    cfg = config.set_theme(stale, "rbee-light")
    assert "max_tokens = 64" in full.read_text() and cfg.matrix.max_tokens == 64


def test_saving_without_a_file_keeps_the_default_local_pool(isolated_home: Path) -> None:
    cfg = config.load()
    assert not cfg.path.exists()
    cfg = config.add_pool(cfg, config.PoolConfig(name="mac", transport="ssh", host="mac.home.arpa"))
    again = config.load()
    assert [p.name for p in again.pools] == ["local", "mac"] == [p.name for p in cfg.pools]
    assert config.set_theme(again, "rbee-light").theme == "rbee-light"
    assert [p.name for p in config.load().pools] == ["local", "mac"]


def test_adding_to_a_file_without_pools_writes_the_default_local_pool_first(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('# just a theme\ntheme = "rbee-light"\n')
    cfg = config.add_pool(config.load(path), config.PoolConfig(name="mac", transport="ssh", host="mac.home.arpa"))
    assert [p.name for p in cfg.pools] == ["local", "mac"]
    assert path.read_text().startswith('# just a theme\ntheme = "rbee-light"\n')


def test_a_corrupt_or_invalid_file_is_reported_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    cfg = replace(config.Config(), path=path)
    for body, error in (("[[pools]\nname = ", CorruptFileError), ('[[pools]]\nname = "a"\nport = 0\n', RbeeError)):
        path.write_text(body)
        with pytest.raises(error):
            config.set_theme(cfg, "rbee-light")
        with pytest.raises(error):
            config.add_pool(cfg, config.PoolConfig(name="mac"))
        assert path.read_text() == body


def test_an_edit_that_would_not_load_is_not_written(full: Path) -> None:
    with pytest.raises(RbeeError, match="invalid host name"):
        config.add_pool(config.load(full), config.PoolConfig(name="bad", transport="ssh", host="x; rm -rf /"))
    assert full.read_text() == FULL


def test_config_init_writes_a_file_that_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "fresh.toml"
    cfg = replace(config.Config(), matrix=config.MatrixConfig(models=("tiny-test",), max_tokens=8))
    config.save(cfg, path)
    again = config.load(path)
    assert again.matrix == cfg.matrix and again.pools == cfg.pools and again.warnings == ()


def test_a_hand_written_inline_pools_array_stays_inline(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('pools = [{ name = "local" }]   # short\n')
    cfg = config.add_pool(config.load(path), config.PoolConfig(name="mac", transport="ssh", host="mac.home.arpa"))
    assert [p.name for p in cfg.pools] == ["local", "mac"]
    assert path.read_text().startswith('pools = [{ name = "local" }, {name = "mac"') and "# short" in path.read_text()
