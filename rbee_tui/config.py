"""The TOML config and the XDG paths: one search seam, with RBEE_CONFIG / --config as the override.

Saves edit the user's own file in place (comments, layout and keys this tool does not know all survive): each
save re-reads the file under its lock, changes only the keys it owns, checks that the result still loads, and
writes it atomically.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import tomli_w
import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Array, Table

from rbee_tui import files
from rbee_tui.errors import CorruptFileError, RbeeError
from rbee_tui.names import BACKENDS, check_backends, check_host, check_id, check_user

DEFAULT_MODELS_DIR = "~/.local/share/rbee/models"
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_MAX_TOKENS = 16
TRANSPORTS = ("local", "ssh")
HEADER = "# rbee-tui config: see README.md, section Configuration\n"
TOP_KEYS = ("theme", "registry", "pools", "matrix", "gateway")
REGISTRY_KEYS = ("endpoint", "models")
MATRIX_KEYS = ("models", "pools", "max_tokens", "clusters", "cluster_ctx", "concurrency", "engines")
MATRIX_ENGINES = ("llama-cpp-python", "llama-server")  # the worker engines a matrix column can name
MAX_CONCURRENCY = 256  # simultaneous streams of one sweep level
DEFAULT_CLUSTER_CTX = 2048
# Pool keys the dashboard's pool form does not show: an edit from the form never removes them.
RPC_KEYS = ("rpc_server", "rpc_host")  # a cluster's ggml-rpc-server on the node (docs/cluster.md)
MEMORY_KEYS = ("memory_budget", "reserve")  # what the pool's workers may use (docs/capacity.md)
KEPT_POOL_KEYS = ("hive_command", "known_hosts", "llama_server", *RPC_KEYS, *MEMORY_KEYS)
GATEWAY_KEYS = ("listen", "api_key", "idle_stop", "start_timeout", "max_body")
DEFAULT_GATEWAY_LISTEN = "127.0.0.1:8080"
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3}
_SIZE_UNITS |= {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}


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
    """The models dir of this machine when nothing names one (follows $XDG_DATA_HOME)."""
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
    models_dir: str | None = None  # None: the node's own default, as rbee-hive there picks it
    hive_command: str = "rbee-hive"
    llama_server: str | None = None
    known_hosts: str | None = None
    rpc_server: str | None = None  # ggml-rpc-server on the node (default: beside llama-server, the build cache)
    # The address the node's ggml-rpc-server listens on for a cluster (docs/cluster.md). Unset: loopback, reached
    # through the dashboard's SSH connections. Set (a LAN address): coordinators dial it directly, which is
    # faster, but llama.cpp RPC has no authentication and no encryption: anyone who reaches it can use the node.
    rpc_host: str | None = None
    # Memory the pool's workers may use in all, in bytes (`memory_budget = "12 GiB"`), or what must stay free
    # (`reserve`). Neither set: the node's available memory less a margin (rbee_tui/capacity.py).
    memory_budget: int | None = None
    reserve: int | None = None

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
    max_tokens: int = DEFAULT_MAX_TOKENS
    clusters: tuple[tuple[str, ...], ...] = ()  # cluster columns: pools a model is split over, the head first
    cluster_ctx: int = DEFAULT_CLUSTER_CTX  # the context the cluster columns plan and run with
    # Simultaneous streams per level of a cell's concurrency sweep, ascending (empty: no sweep).
    concurrency: tuple[int, ...] = ()
    # Worker engines per pool column (empty: the embedded engine alone); a second engine is a column of its own.
    engines: tuple[str, ...] = ()


def cluster_spec(value: Any, known: list[str] | None = None) -> tuple[str, ...]:
    """`head+node+node` -> its pool names, refusing a malformed one, a pool named twice or (given `known`) an
    unknown pool."""
    if not isinstance(value, str) or not value.strip():
        raise RbeeError(f"a cluster is pool names joined by '+', e.g. \"local+node2\", not {value!r}")
    names = tuple(n.strip() for n in value.split("+"))
    for name in names:
        try:
            check_id(name, "pool name")
        except RbeeError as exc:
            raise RbeeError(f"cluster {value!r}: {exc.message}", exc.hint) from None
    if len(names) < 2:
        raise RbeeError(f'cluster {value!r} names one pool: a cluster spans two or more, e.g. "{value}+node2"')
    if len(set(names)) != len(names):
        raise RbeeError(f"cluster {value!r} names a pool twice")
    if known is not None:
        for name in names:
            if name not in known:
                raise RbeeError(f"cluster {value!r} names no pool {name!r}", f"known pools: {', '.join(known)}")
    return names


@dataclass(frozen=True)
class GatewayConfig:
    """The fleet's one OpenAI endpoint (`rbee-tui gateway`)."""

    listen: str = DEFAULT_GATEWAY_LISTEN
    api_key: str | None = None  # required off loopback; $RBEE_GATEWAY_API_KEY overrides
    idle_stop: float = 600.0  # seconds: a worker the gateway started and nobody used since is stopped
    start_timeout: float = 300.0  # seconds a request waits for a worker started on demand
    max_body: int = 4 << 20  # bytes of a request body


@dataclass(frozen=True)
class Config:
    """The whole config file, and the warnings about keys in it that nothing reads."""

    pools: tuple[PoolConfig, ...] = field(default_factory=lambda: (local_pool(),))
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    theme: str = "rbee-dark"
    path: Path | None = None
    matrix: MatrixConfig = field(default_factory=MatrixConfig)
    warnings: tuple[str, ...] = ()
    gateway: GatewayConfig = field(default_factory=GatewayConfig)

    def pool(self, name: str) -> PoolConfig:
        """The pool called `name`, or a clear error listing the known ones."""
        for p in self.pools:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.pools) or "none"
        raise RbeeError(f"no pool named {name!r}", f"known pools: {known}")

    def with_pool(self, pool: PoolConfig) -> Config:
        """A copy with `pool` added, or replacing the pool of the same name (in memory; see add_pool to save)."""
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
        doc["matrix"] = {
            "models": list(self.matrix.models),
            "pools": list(self.matrix.pools),
            "max_tokens": self.matrix.max_tokens,
        }
        if self.matrix.clusters:
            doc["matrix"]["clusters"] = ["+".join(c) for c in self.matrix.clusters]
        if self.matrix.cluster_ctx != DEFAULT_CLUSTER_CTX:
            doc["matrix"]["cluster_ctx"] = self.matrix.cluster_ctx
        if self.matrix.concurrency:
            doc["matrix"]["concurrency"] = list(self.matrix.concurrency)
        if self.matrix.engines:
            doc["matrix"]["engines"] = list(self.matrix.engines)
        gateway = {k: v for k, v in asdict(self.gateway).items() if v is not None and v != getattr(GatewayConfig, k)}
        if gateway:
            doc["gateway"] = gateway
        return doc


def local_pool() -> PoolConfig:
    """The pool a config-less start gets: this machine, CPU, models in its default dir."""
    return PoolConfig(name="local", transport="local")


def _unknown_keys(table: dict[str, Any], known: tuple[str, ...], at: str) -> list[str]:
    """A warning naming the keys of `table` that nothing reads (they are kept in the file, not used)."""
    extra = sorted(set(table) - set(known))
    if not extra:
        return []
    return [f"{at}: unknown key(s) {', '.join(extra)} ignored (known: {', '.join(known)})"]


def _int(value: Any, what: str, low: int, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        span = f"{low}-{high}" if high is not None else f"{low} or more"
        raise RbeeError(f"{what} must be an integer {span}, got {value!r}")
    return value


def size_bytes(value: Any, what: str) -> int:
    """A size in bytes from an integer or a string such as "12 GiB", "512M", "3.5GB"; a clear error otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number) :]
        try:
            amount = float(number)
        except ValueError:
            amount = -1.0
        if amount >= 0 and unit in _SIZE_UNITS:
            return int(amount * _SIZE_UNITS[unit])
    raise RbeeError(f'{what} must be a size in bytes or a string such as "12 GiB" or "512M", got {value!r}')


def _pool_from(raw: Any, index: int, where: str, warnings: list[str]) -> PoolConfig:
    at = f"{where}: pools[{index}]"
    if not isinstance(raw, dict):
        raise RbeeError(f"{at} must be a table")
    known = tuple(PoolConfig.__dataclass_fields__)
    label = f"{at} ({raw['name']})" if isinstance(raw.get("name"), str) else at
    warnings.extend(_unknown_keys(raw, known, label))
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
        if raw.get("rpc_host") is not None:
            check_host(raw["rpc_host"])
        port = _int(raw.get("port", 22), "port", 1, 65535)
        backends = raw.get("backends", ["cpu"])
        if not isinstance(backends, list) or not all(isinstance(b, str) for b in backends):
            raise RbeeError(f"backends must be a list of names from {', '.join(BACKENDS)}")
        check_backends(backends)
        for key in (*("identity_file", "models_dir", "hive_command", "llama_server", "known_hosts"), *RPC_KEYS):
            if key in raw and (not isinstance(raw[key], str) or not raw[key].strip()):
                raise RbeeError(f"{key} must be a non-empty string")
        sizes = {key: size_bytes(raw[key], key) for key in MEMORY_KEYS if raw.get(key) is not None}
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
        models_dir=raw.get("models_dir"),
        hive_command=raw.get("hive_command", "rbee-hive"),
        llama_server=raw.get("llama_server"),
        known_hosts=raw.get("known_hosts"),
        rpc_server=raw.get("rpc_server"),
        rpc_host=raw.get("rpc_host"),
        memory_budget=sizes.get("memory_budget"),
        reserve=sizes.get("reserve"),
    )


def _number(value: Any, what: str, low: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < low:
        raise RbeeError(f"{what} must be a number of seconds, {low} or more, got {value!r}")
    return float(value)


def _gateway_from(raw: Any, where: str, warnings: list[str]) -> GatewayConfig:
    if not isinstance(raw, dict):
        raise RbeeError(f"{where}: gateway must be a table ([gateway])")
    warnings.extend(_unknown_keys(raw, GATEWAY_KEYS, f"{where}: [gateway]"))
    try:
        listen = raw.get("listen", DEFAULT_GATEWAY_LISTEN)
        if not isinstance(listen, str) or ":" not in listen:
            raise RbeeError(f'gateway.listen must be "host:port", got {listen!r}')
        key = raw.get("api_key")
        if key is not None and (not isinstance(key, str) or not key.strip()):
            raise RbeeError("gateway.api_key must be a non-empty string")
        return GatewayConfig(
            listen=listen,
            api_key=key,
            idle_stop=_number(raw.get("idle_stop", GatewayConfig.idle_stop), "gateway.idle_stop", 0),
            start_timeout=_number(raw.get("start_timeout", GatewayConfig.start_timeout), "gateway.start_timeout", 1),
            max_body=size_bytes(raw.get("max_body", GatewayConfig.max_body), "gateway.max_body"),
        )
    except RbeeError as exc:
        raise RbeeError(f"{where}: {exc.message}", exc.hint) from None


def _names(value: Any, what: str, check: Callable[[str, str], str], label: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RbeeError(f'{what} must be a list of {label}s, e.g. ["a", "b"]')
    try:
        return tuple(check(v, label) for v in value)
    except RbeeError as exc:
        raise RbeeError(f"{what}: {exc.message}", exc.hint) from None


def concurrency_levels(value: Any, what: str = "concurrency") -> tuple[int, ...]:
    """Sweep levels from a list of integers or a string such as "1,2,4": ascending, each used once, 1 to 256."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    hint = 'e.g. "1,2,4,8"' if isinstance(value, str) else "e.g. [1, 2, 4, 8]"
    if not isinstance(items, list | tuple) or not items:
        raise RbeeError(f"{what} must list the simultaneous streams of each level, {hint}, got {value!r}")
    levels = []
    for item in items:
        level = int(item) if isinstance(item, str) and item.isdigit() else item
        if not isinstance(level, int) or isinstance(level, bool) or not 1 <= level <= MAX_CONCURRENCY:
            raise RbeeError(f"{what}: each level is a whole number from 1 to {MAX_CONCURRENCY}, got {item!r}", hint)
        levels.append(level)
    return tuple(sorted(set(levels)))


def engine_names(value: Any, what: str = "engines") -> tuple[str, ...]:
    """Worker engines from a list or a string such as "llama-cpp-python,llama-server", each known, in order."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items or not all(isinstance(i, str) for i in items):
        raise RbeeError(f"{what} must list worker engines, e.g. {list(MATRIX_ENGINES)}, got {value!r}")
    bad = [i for i in items if i not in MATRIX_ENGINES]
    if bad:
        raise RbeeError(f"{what}: unknown engine(s) {', '.join(bad)}", f"choose from {', '.join(MATRIX_ENGINES)}")
    return tuple(dict.fromkeys(items))


def _matrix_from(raw: Any, where: str, pools: tuple[PoolConfig, ...], warnings: list[str]) -> MatrixConfig:
    if not isinstance(raw, dict):
        raise RbeeError(f"{where}: matrix must be a table ([matrix])")
    warnings.extend(_unknown_keys(raw, MATRIX_KEYS, f"{where}: [matrix]"))
    models = _names(raw.get("models", []), f"{where}: matrix.models", check_id, "model id")
    names = _names(raw.get("pools", []), f"{where}: matrix.pools", check_id, "pool name")
    known = [p.name for p in pools]
    for name in names:
        if name not in known:
            raise RbeeError(f"{where}: matrix.pools names no pool {name!r}", f"known pools: {', '.join(known)}")
    try:
        max_tokens = _int(raw.get("max_tokens", DEFAULT_MAX_TOKENS), "matrix.max_tokens", 1, 1 << 20)
        cluster_ctx = _int(raw.get("cluster_ctx", DEFAULT_CLUSTER_CTX), "matrix.cluster_ctx", 1, 1 << 30)
        sweep = concurrency_levels(raw["concurrency"], "matrix.concurrency") if "concurrency" in raw else ()
        engines = engine_names(raw["engines"], "matrix.engines") if "engines" in raw else ()
    except RbeeError as exc:
        raise RbeeError(f"{where}: {exc.message}", exc.hint) from None
    clusters = raw.get("clusters", [])
    if not isinstance(clusters, list):
        raise RbeeError(f'{where}: matrix.clusters must be a list of clusters, e.g. ["local+node2+node3"]')
    try:
        specs = tuple(cluster_spec(c, known) for c in clusters)
    except RbeeError as exc:
        raise RbeeError(f"{where}: matrix.clusters: {exc.message}", exc.hint) from None
    return MatrixConfig(
        models=models,
        pools=names,
        max_tokens=max_tokens,
        clusters=specs,
        cluster_ctx=cluster_ctx,
        concurrency=sweep,
        engines=engines,
    )


def parse(doc: dict[str, Any], where: str = "config") -> Config:
    """Build a Config from a parsed TOML document, with errors that name the offending key.

    Keys nothing reads are not errors: they become `Config.warnings` (a typo should not lock anyone out).
    """
    warnings = _unknown_keys(doc, TOP_KEYS, where)
    raw_pools = doc.get("pools")
    if raw_pools is None:
        pools: tuple[PoolConfig, ...] = (local_pool(),)
    else:
        if not isinstance(raw_pools, list) or not raw_pools:
            raise RbeeError(f"{where}: pools must be a non-empty array of tables ([[pools]])")
        pools = tuple(_pool_from(p, i, where, warnings) for i, p in enumerate(raw_pools))
        names = [p.name for p in pools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RbeeError(f"{where}: pool name(s) used twice: {', '.join(dupes)}")
    reg = doc.get("registry", {})
    if not isinstance(reg, dict):
        raise RbeeError(f"{where}: registry must be a table")
    warnings.extend(_unknown_keys(reg, REGISTRY_KEYS, f"{where}: [registry]"))
    endpoint = reg.get("endpoint", DEFAULT_ENDPOINT)
    if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
        raise RbeeError(f"{where}: registry.endpoint must be an http(s) URL, got {endpoint!r}")
    models = reg.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise RbeeError(f"{where}: registry.models must be an array of tables ([[registry.models]])")
    theme = doc.get("theme", "rbee-dark")
    if not isinstance(theme, str) or not theme:
        raise RbeeError(f"{where}: theme must be a non-empty string")
    matrix = _matrix_from(doc.get("matrix", {}), where, pools, warnings)
    gateway = _gateway_from(doc.get("gateway", {}), where, warnings)
    return Config(
        pools=pools,
        registry=RegistryConfig(endpoint=endpoint, models=tuple(models)),
        theme=theme,
        matrix=matrix,
        gateway=gateway,
        warnings=tuple(warnings),
    )


def _decode(raw: bytes, path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = raw.decode("utf-8")
        return text, tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(str(path), f"not valid TOML ({exc})", "fix it by hand or move it away") from None


def load(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Read the config; a missing file means the built-in default (one local pool)."""
    path = config_path(explicit)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise RbeeError(f"config file {path} does not exist") from None
        return replace(Config(), path=path)
    _, doc = _decode(raw, path)
    return replace(parse(doc, str(path)), path=path)


def render(cfg: Config) -> str:
    """The whole config as a fresh file's text."""
    return HEADER + tomli_w.dumps(cfg.to_toml())


def save(cfg: Config, explicit: str | os.PathLike[str] | None = None) -> Path:
    """Atomically write the whole config as a fresh file (`rbee-tui config init`) and return where.

    It replaces what is there: to change one setting of a user's file, use set_theme, add_pool or update_pool.
    """
    path = Path(explicit).expanduser() if explicit else (cfg.path or config_path())
    with files.locked(path):
        files.atomic_write(path, render(cfg))
    return path


# -- edits of the user's own file ---------------------------------------------------------------------------


def _edit(cfg: Config, change: Callable[[tomlkit.TOMLDocument, Config], None]) -> Config:
    """Apply `change` to the file as it is now (read under its lock), check the result loads, write it back."""
    path = cfg.path or config_path()
    with files.locked(path):
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = None
        if raw is None:
            # No file yet: start from the config in force (the built-in default pool included), so that
            # saving one setting does not drop the rest.
            text, plain = render(cfg), tomllib.loads(render(cfg))
        else:
            text, plain = _decode(raw, path)
        current = parse(plain, str(path))  # a file that does not load is reported, never overwritten
        try:
            doc = tomlkit.parse(text)
        except TOMLKitError as exc:
            raise CorruptFileError(str(path), f"not valid TOML ({exc})", "fix it by hand or move it away") from None
        change(doc, current)
        updated = parse(doc.unwrap(), str(path))
        files.atomic_write(path, tomlkit.dumps(doc))
    return replace(updated, path=path)


def _pools_of(doc: tomlkit.TOMLDocument, current: Config) -> AoT | Array:
    """The file's pools array; a file with none gets the pools in force written out first (the default local)."""
    if "pools" not in doc:
        aot = tomlkit.aot()
        for pool in current.pools:
            aot.append(_table(pool.to_toml()))
        doc["pools"] = aot
    return doc["pools"]  # type: ignore[return-value]


def _table(values: dict[str, Any]) -> Table:
    table = tomlkit.table()
    for key, value in values.items():
        table[key] = value
    return table


def set_theme(cfg: Config, theme: str) -> Config:
    """Save the theme in the config file, touching nothing else; return the config now in force."""

    def change(doc: tomlkit.TOMLDocument, current: Config) -> None:
        doc["theme"] = theme

    return _edit(cfg, change)


def set_matrix_concurrency(cfg: Config, levels: tuple[int, ...]) -> Config:
    """Save `[matrix] concurrency` (empty: the key goes, no sweep), touching nothing else; return the config."""

    def change(doc: tomlkit.TOMLDocument, current: Config) -> None:
        if "matrix" not in doc:
            if levels:
                doc["matrix"] = {"concurrency": list(levels)}
        elif levels:
            doc["matrix"]["concurrency"] = list(levels)  # type: ignore[index]
        else:
            doc["matrix"].pop("concurrency", None)  # type: ignore[union-attr]

    return _edit(cfg, change)


def add_pool(cfg: Config, pool: PoolConfig) -> Config:
    """Append a pool entry to the config file; a name already in use (in the file or in `cfg`) is refused."""

    def change(doc: tomlkit.TOMLDocument, current: Config) -> None:
        if pool.name in {p.name for p in (*current.pools, *cfg.pools)}:
            raise RbeeError(f"a pool named {pool.name} exists", "edit that pool, or give this one another name")
        pools = _pools_of(doc, current)
        values = pool.to_toml()
        if isinstance(pools, AoT):
            entry = _table(values)
            if list(doc.keys())[-1] != "pools":
                entry.add(tomlkit.nl())  # a blank line before the table that follows, as a person would leave
            pools.append(entry)
        else:  # `pools = [{...}, ...]`, written inline by hand: stay inline
            inline = tomlkit.inline_table()
            inline.update(values)
            pools.append(inline)

    return _edit(cfg, change)


def update_pool(cfg: Config, name: str, pool: PoolConfig) -> Config:
    """Edit the config file's entry for pool `name` to say `pool` (which may rename it).

    Only keys whose value changes are written; a key is removed only when `pool` leaves it unset; the keys the
    pool form does not show (hive_command, known_hosts, llama_server) and keys this tool does not know stay.
    """

    def change(doc: tomlkit.TOMLDocument, current: Config) -> None:
        names = [p.name for p in current.pools]
        if name not in names:
            raise RbeeError(
                f"no pool named {name!r} in {cfg.path or config_path()}", f"known pools: {', '.join(names)}"
            )
        if pool.name != name and pool.name in {*names, *(p.name for p in cfg.pools)}:
            raise RbeeError(f"a pool named {pool.name} exists", "choose another name")
        index = names.index(name)
        entry = _pools_of(doc, current)[index]
        old, new = current.pools[index].to_toml(), pool.to_toml()
        for key, value in new.items():
            if old.get(key) != value:
                entry[key] = value
        for key in list(entry.keys()):
            if key in PoolConfig.__dataclass_fields__ and key not in new and key not in KEPT_POOL_KEYS:
                del entry[key]
        matrix = doc.get("matrix")
        if pool.name != name and isinstance(matrix, dict) and isinstance(matrix.get("pools"), list):
            # The default matrix names pools: follow the rename, or the file would no longer load.
            listed = matrix["pools"]
            for i, value in enumerate(list(listed)):
                if value == name:
                    listed[i] = pool.name
        if pool.name != name and isinstance(matrix, dict) and isinstance(matrix.get("clusters"), list):
            clusters = matrix["clusters"]  # likewise the cluster columns' pools
            for i, value in enumerate(list(clusters)):
                if isinstance(value, str) and name in value.split("+"):
                    clusters[i] = "+".join(pool.name if n == name else n for n in value.split("+"))

    return _edit(cfg, change)
