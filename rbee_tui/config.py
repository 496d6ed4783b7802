"""The TOML config and the XDG paths: one search seam, with RBEE_CONFIG / --config as the override."""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import tomli_w

from rbee_tui import files
from rbee_tui.errors import CorruptFileError, RbeeError
from rbee_tui.names import BACKENDS, check_backends, check_host, check_id, check_user

DEFAULT_MODELS_DIR = "~/.local/share/rbee/models"
DEFAULT_ENDPOINT = "https://huggingface.co"
TRANSPORTS = ("local", "ssh")


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where the config lives: `--config`, else $RBEE_CONFIG, else $XDG_CONFIG_HOME/rbee/config.toml."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("RBEE_CONFIG"):
        return Path(os.environ["RBEE_CONFIG"]).expanduser()
    return _xdg("XDG_CONFIG_HOME", ".config") / "rbee" / "config.toml"


def data_dir() -> Path:
    """$XDG_DATA_HOME/rbee: models and results."""
    return _xdg("XDG_DATA_HOME", ".local/share") / "rbee"


def state_dir() -> Path:
    """$XDG_STATE_HOME/rbee: worker registry and logs."""
    return _xdg("XDG_STATE_HOME", ".local/state") / "rbee"


def default_models_dir() -> str:
    """The models dir a pool gets when its entry names none (follows $XDG_DATA_HOME)."""
    if os.environ.get("XDG_DATA_HOME"):
        return str(data_dir() / "models")
    return DEFAULT_MODELS_DIR


@dataclass(frozen=True)
class PoolConfig:
    """One machine: how to reach it and what it can run."""

    name: str
    transport: str = "local"
    host: str | None = None
    port: int = 22
    user: str | None = None
    identity_file: str | None = None
    backends: tuple[str, ...] = ("cpu",)
    gpus: int = 0
    models_dir: str = DEFAULT_MODELS_DIR
    hive_command: str = "rbee-hive"
    llama_server: str | None = None
    known_hosts: str | None = None

    def models_path(self) -> Path:
        """The models dir with `~` expanded (meaningful on the pool's own machine)."""
        return Path(self.models_dir).expanduser()

    def to_toml(self) -> dict[str, Any]:
        """The entry as written to the config file, leaving out unset optional keys."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out["backends"] = list(self.backends)
        if self.transport == "local":
            for key in ("host", "port", "user", "identity_file"):
                out.pop(key, None)
        if out.get("hive_command") == "rbee-hive":
            out.pop("hive_command")
        return out


@dataclass(frozen=True)
class RegistryConfig:
    """Where models come from: the hub endpoint and extra models registered in every new catalog."""

    endpoint: str = DEFAULT_ENDPOINT
    models: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class MatrixConfig:
    """The default matrix: which models and pools (empty: models downloaded somewhere, every pool)."""

    models: tuple[str, ...] = ()
    pools: tuple[str, ...] = ()
    max_tokens: int = 16


@dataclass(frozen=True)
class Config:
    """The whole config file."""

    pools: tuple[PoolConfig, ...] = field(default_factory=lambda: (local_pool(),))
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    theme: str = "rbee-dark"
    path: Path | None = None
    matrix: MatrixConfig = field(default_factory=MatrixConfig)

    def pool(self, name: str) -> PoolConfig:
        """The pool called `name`, or a clear error listing the known ones."""
        for p in self.pools:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.pools) or "none"
        raise RbeeError(f"no pool named {name!r}", f"known pools: {known}")

    def with_pool(self, pool: PoolConfig) -> Config:
        """A copy with `pool` added, or replacing the pool of the same name."""
        pools = [p for p in self.pools if p.name != pool.name]
        index = next((i for i, p in enumerate(self.pools) if p.name == pool.name), len(pools))
        pools.insert(index, pool)
        return replace(self, pools=tuple(pools))

    def to_toml(self) -> dict[str, Any]:
        """The config as a TOML document."""
        doc: dict[str, Any] = {"theme": self.theme}
        registry: dict[str, Any] = {"endpoint": self.registry.endpoint}
        if self.registry.models:
            registry["models"] = [dict(m) for m in self.registry.models]
        doc["registry"] = registry
        doc["pools"] = [p.to_toml() for p in self.pools]
        if self.matrix != MatrixConfig():
            doc["matrix"] = {
                "models": list(self.matrix.models),
                "pools": list(self.matrix.pools),
                "max_tokens": self.matrix.max_tokens,
            }
        return doc


def local_pool() -> PoolConfig:
    """The pool a config-less start gets: this machine, CPU, models in the XDG data dir."""
    return PoolConfig(name="local", transport="local", models_dir=default_models_dir())


def _pool_from(raw: Any, index: int, where: str) -> PoolConfig:
    at = f"{where}: pools[{index}]"
    if not isinstance(raw, dict):
        raise RbeeError(f"{at} must be a table")
    known = set(PoolConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RbeeError(f"{at} has unknown key(s) {', '.join(unknown)}", f"known keys: {', '.join(sorted(known))}")
    try:
        name = check_id(raw.get("name", ""), "pool name")
        transport = raw.get("transport", "local")
        if transport not in TRANSPORTS:
            raise RbeeError(f"transport must be 'local' or 'ssh', got {transport!r}")
        host = raw.get("host")
        if transport == "ssh":
            if not host:
                raise RbeeError("an ssh pool needs a host")
            check_host(host)
        user = raw.get("user")
        if user is not None:
            check_user(user)
        port = raw.get("port", 22)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise RbeeError(f"port must be an integer 1-65535, got {port!r}")
        gpus = raw.get("gpus", 0)
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
            raise RbeeError(f"gpus must be a non-negative integer, got {gpus!r}")
        backends = raw.get("backends", ["cpu"])
        if not isinstance(backends, list) or not all(isinstance(b, str) for b in backends):
            raise RbeeError(f"backends must be a list of names from {', '.join(BACKENDS)}")
        check_backends(backends)
        for key in ("identity_file", "models_dir", "hive_command", "llama_server", "known_hosts"):
            if key in raw and not isinstance(raw[key], str):
                raise RbeeError(f"{key} must be a string")
    except RbeeError as exc:
        raise RbeeError(f"{at}: {exc.message}", exc.hint) from None
    return PoolConfig(
        name=name,
        transport=transport,
        host=host,
        port=port,
        user=user,
        identity_file=raw.get("identity_file"),
        backends=tuple(backends),
        gpus=gpus,
        models_dir=raw.get("models_dir", default_models_dir()),
        hive_command=raw.get("hive_command", "rbee-hive"),
        llama_server=raw.get("llama_server"),
        known_hosts=raw.get("known_hosts"),
    )


def parse(doc: dict[str, Any], where: str = "config") -> Config:
    """Build a Config from a parsed TOML document, with errors that name the offending key."""
    unknown = sorted(set(doc) - {"pools", "registry", "theme", "matrix"})
    if unknown:
        raise RbeeError(f"{where}: unknown key(s) {', '.join(unknown)}", "known keys: pools, registry, theme, matrix")
    raw_pools = doc.get("pools")
    if raw_pools is None:
        pools: tuple[PoolConfig, ...] = (local_pool(),)
    else:
        if not isinstance(raw_pools, list) or not raw_pools:
            raise RbeeError(f"{where}: pools must be a non-empty array of tables ([[pools]])")
        pools = tuple(_pool_from(p, i, where) for i, p in enumerate(raw_pools))
        names = [p.name for p in pools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RbeeError(f"{where}: pool name(s) used twice: {', '.join(dupes)}")
    reg = doc.get("registry", {})
    if not isinstance(reg, dict):
        raise RbeeError(f"{where}: registry must be a table")
    endpoint = reg.get("endpoint", DEFAULT_ENDPOINT)
    if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
        raise RbeeError(f"{where}: registry.endpoint must be an http(s) URL, got {endpoint!r}")
    models = reg.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise RbeeError(f"{where}: registry.models must be an array of tables ([[registry.models]])")
    theme = doc.get("theme", "rbee-dark")
    if not isinstance(theme, str):
        raise RbeeError(f"{where}: theme must be a string")
    return Config(pools=pools, registry=RegistryConfig(endpoint=endpoint, models=tuple(models)), theme=theme)


def load(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Read the config; a missing file means the built-in default (one local pool)."""
    path = config_path(explicit)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise RbeeError(f"config file {path} does not exist") from None
        return replace(Config(), path=path)
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(str(path), f"not valid TOML ({exc})", "fix it by hand or move it away") from None
    return replace(parse(doc, str(path)), path=path)


def save(cfg: Config, explicit: str | os.PathLike[str] | None = None) -> Path:
    """Atomically write the config (to its own path unless told otherwise) and return where."""
    path = Path(explicit).expanduser() if explicit else (cfg.path or config_path())
    body = tomli_w.dumps(cfg.to_toml())
    with files.locked(path):
        files.atomic_write(path, "# rbee-tui config: see README.md, section Configuration\n" + body)
    return path
