"""The node's ggml-rpc-server: builds, devices, the registry, start/status/stop with the real binary."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import psutil
import pytest

from rbee_tui.cluster.layers import read_shape, shape_from_json, shape_to_json
from rbee_tui.config import parse
from rbee_tui.errors import RbeeError
from rbee_tui.hive import rpc
from rbee_tui.tinymodel import TinySpec, write_model
from tests.conftest import wait_for


def _fake_build(root: Path, version: str, commit: str = "0.5.0-dev (build 0, commit unknown)") -> Path:
    bin_dir = root / version / "bin"
    bin_dir.mkdir(parents=True)
    binary = bin_dir / "ggml-rpc-server"
    binary.write_text("#!/bin/sh\necho 'error: unknown argument' >&2\nexit 0\n")
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    (bin_dir / "BUILD_COMMIT").write_text(commit + "\n")
    return binary


def test_the_build_is_the_cache_version_else_the_commit_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_LLAMA_CPP_CACHE", str(tmp_path / "cache"))
    cached = _fake_build(tmp_path / "cache", "0.3.36-d0fc6ee6")
    assert rpc.build_of(str(cached)) == "0.3.36-d0fc6ee6"
    elsewhere = _fake_build(tmp_path / "opt", "x", commit="b6743 (c7be9feb)")
    assert rpc.build_of(str(elsewhere)) == "b6743 (c7be9feb)"
    assert rpc.build_of(str(tmp_path / "nowhere" / "ggml-rpc-server")) == "unknown"
    # Found in the cache when nothing names one; a path that is not there is an error, not a fallback.
    monkeypatch.delenv("RBEE_RPC_SERVER", raising=False)
    assert rpc.find_rpc_server() == str(cached)
    with pytest.raises(RbeeError, match="ggml-rpc-server not found at /no/such"):
        rpc.find_rpc_server("/no/such")


def test_devices_are_read_from_the_servers_start_lines(tmp_path: Path) -> None:
    log = tmp_path / "rpc.log"
    log.write_text(
        "Starting RPC server v7.0.0\n  endpoint       : 127.0.0.1:50052\nDevices:\n"
        "  CPU: AMD EPYC (24105 MiB, 20000 MiB free)\n  CUDA0: NVIDIA RTX 4090 (24564 MiB, 23000 MiB free)\n"
    )
    assert rpc.devices(str(log)) == [
        {"name": "CPU", "description": "AMD EPYC", "total_bytes": 24105 << 20, "free_bytes": 20000 << 20},
        {"name": "CUDA0", "description": "NVIDIA RTX 4090", "total_bytes": 24564 << 20, "free_bytes": 23000 << 20},
    ]


def test_a_model_shape_survives_json(tmp_path: Path) -> None:
    shape = read_shape(write_model(tmp_path / "m.gguf", TinySpec(n_layer=3)))
    assert shape_from_json(shape_to_json(shape)) == shape
    with pytest.raises(RbeeError, match="model shape this version cannot read"):
        shape_from_json({"arch": "llama"})


def test_rpc_host_is_checked_and_kept() -> None:
    cfg = parse({"pools": [{"name": "n1", "transport": "ssh", "host": "n1", "rpc_host": "192.168.1.20"}]})
    assert cfg.pools[0].rpc_host == "192.168.1.20" and cfg.pools[0].to_toml()["rpc_host"] == "192.168.1.20"
    with pytest.raises(RbeeError, match="invalid host name"):
        parse({"pools": [{"name": "n1", "transport": "ssh", "host": "n1", "rpc_host": "a;b"}]})


def test_a_binary_that_exits_at_once_is_reported_and_not_left_registered(tmp_path: Path) -> None:
    # ggml-rpc-server exits 0 on an unknown flag: only the port tells that it runs.
    binary = _fake_build(tmp_path / "opt", "x")
    registry = rpc.RpcRegistry("local")
    with pytest.raises(RbeeError, match="ended before it listened: exit code 0: error: unknown argument"):
        rpc.start(registry, binary=str(binary), cache=False)
    assert registry.read() == []


def _real() -> str | None:
    try:
        return rpc.find_rpc_server()
    except RbeeError:
        return None


@pytest.mark.skipif(_real() is None, reason="ggml-rpc-server is not built: run scripts/build-llama-cpp.sh")
def test_start_status_busy_stop_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    registry = rpc.RpcRegistry("local")
    server = rpc.start(registry, threads=1)
    try:
        assert server["state"] == "running" and server["listening"] and not server["busy"]
        assert server["host"] == "127.0.0.1" and server["kind"] == "rpc" and server["build"] != "unknown"
        assert server["cache_dir"] == str(tmp_path / "cache" / "rbee" / "rpc")
        assert server["devices"] and server["devices"][0]["total_bytes"] > 0
        with pytest.raises(RbeeError, match="already runs on this node"):
            rpc.start(registry, threads=1)
        # A coordinator connected: busy (one client at a time).
        with socket.create_connection(("127.0.0.1", server["port"])):
            wait_for(lambda: rpc.status(registry, "local")["server"]["busy"], 10, what="busy")
        pids = [server["pid"], server["worker_pid"]]
    finally:
        out = rpc.stop(registry)
    assert out["stopped"] and not rpc.status(registry, "local")["running"]
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert rpc.stop(registry) == {"worker_id": "rpc", "stopped": False, "running": False}
