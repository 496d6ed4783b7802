"""Trusting an SSH pool's host key: exactly the key the user was shown, against real sshd on 127.0.0.1."""

from __future__ import annotations

import getpass
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from rbee_tui.config import PoolConfig
from rbee_tui.errors import HostKeyChanged, HostKeyUnknown, RbeeError
from rbee_tui.pools.client import LOST, PoolClient
from rbee_tui.pools.hostkeys import trust
from tests.conftest import BIN, hive_cmd
from tests.support.sshd import Sshd, _free_port, environment_for, keygen, sshd_available
from tests.support.waiting import until

pytestmark = pytest.mark.skipif(sshd_available() is not None, reason=str(sshd_available()))


def fingerprint_of(host_key: Path) -> str:
    """The fingerprint as OpenSSH itself prints it (not through the code under test)."""
    out = subprocess.run(["ssh-keygen", "-lf", f"{host_key}.pub"], capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


class Node:
    """One machine reachable over SSH whose sshd can be swapped for another with its own host key, same port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = keygen(root / "client_key")
        self.env = environment_for(root / "home")
        self.port = _free_port()
        self.sshd = Sshd(root / "sshd-a", self.key, env=self.env, port=self.port).start()
        hive = str(BIN / "rbee-hive") if (BIN / "rbee-hive").exists() else " ".join(hive_cmd())
        self.pool = PoolConfig(
            name="box",
            transport="ssh",
            host="127.0.0.1",
            port=self.port,
            user=getpass.getuser(),
            identity_file=str(self.key),
            known_hosts=str(root / "known_hosts"),  # not made yet: the key is unknown
            models_dir=str(root / "home" / "models"),
            hive_command=hive,
        )

    def swap(self) -> Sshd:
        """Another machine answers on the same address (a man in the middle, or a reinstall)."""
        self.sshd.kill()
        self.sshd = Sshd(self.root / "sshd-b", self.key, env=self.env, port=self.port).start()
        return self.sshd

    def stop(self) -> None:
        self.sshd.stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.stop()


async def refusal(pool: PoolConfig) -> RbeeError:
    c = PoolClient(pool, max_backoff=1)
    c.start()
    try:
        await until(lambda: c.view.state == LOST, 20, "a refusal")
        assert c.view.error is not None
        return c.view.error
    finally:
        await c.close()


async def test_an_unknown_key_is_a_typed_error_naming_the_trust_command(node: Node) -> None:
    error = await refusal(node.pool)
    assert isinstance(error, HostKeyUnknown)
    assert (error.pool, error.where) == ("box", f"127.0.0.1:{node.port}")
    assert error.fingerprint == fingerprint_of(node.sshd.host_key)
    assert "is unknown (SHA256:" in str(error)  # the text the dashboard matched before the type existed
    assert error.hint == "check it, then accept it with: rbee-tui trust box"


async def test_trust_refuses_a_key_other_than_the_one_shown(node: Node) -> None:
    shown = (await refusal(node.pool)).fingerprint  # what the dialog showed the user
    other = node.swap()  # between showing and trusting, another machine answers
    known_hosts = Path(node.pool.known_hosts or "")
    with pytest.raises(RbeeError) as err:
        await trust(node.pool, shown)
    now = fingerprint_of(other.host_key)
    assert now != shown
    assert f"now presents {now}, you were shown {shown}: not trusted" in str(err.value)
    assert not known_hosts.exists()

    # The normal path: the key shown is the key presented; it is trusted and the pool connects.
    error = await refusal(node.pool)
    assert isinstance(error, HostKeyUnknown) and error.fingerprint == now
    assert await trust(node.pool, error.fingerprint) == now
    assert known_hosts.read_text().split() == [
        f"[127.0.0.1]:{node.port}",
        *Path(f"{other.host_key}.pub").read_text().split()[:2],
    ]
    c = PoolClient(node.pool)
    c.start()
    try:
        await c.wait_connected(30)
        assert c.view.error is None
    finally:
        await c.close()
    with pytest.raises(RbeeError, match="already has a key"):
        await trust(node.pool, now)


async def test_a_changed_key_is_a_typed_error(node: Node) -> None:
    shown = (await refusal(node.pool)).fingerprint
    await trust(node.pool, shown)
    node.swap()
    error = await refusal(node.pool)
    assert isinstance(error, HostKeyChanged)
    assert error.expected == (shown,) and error.fingerprint == fingerprint_of(node.sshd.host_key)
    assert "CHANGED" in str(error) and "ssh-keygen -R" in str(error)


def cli(node: Node, tmp_path: Path, *args: str) -> list[str]:
    cfg = tmp_path / "config.toml"
    cfg.write_text(tomli_w.dumps({"pools": [node.pool.to_toml()]}))
    return [sys.executable, "-m", "rbee_tui.cli", "--config", str(cfg), *args]


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
    return lines.get(timeout=timeout)


async def test_cli_trust_writes_the_very_key_it_showed(node: Node, tmp_path: Path) -> None:
    shown_key = node.sshd.host_key
    proc = subprocess.Popen(
        cli(node, tmp_path, "trust", "box"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _first_line(proc, 60)
        assert fingerprint_of(shown_key) in line and f"127.0.0.1:{node.port} presents" in line
        node.swap()  # the user reads the fingerprint; meanwhile another machine takes the address
        out, err = proc.communicate("y\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "added to" in out
    # What was written is the key the user saw, not whatever a second connection would have met.
    blob = Path(f"{shown_key}.pub").read_text().split()[1]
    assert Path(node.pool.known_hosts or "").read_text().split()[2] == blob
    assert isinstance(await refusal(node.pool), HostKeyChanged)


async def test_cli_trust_yes_then_the_pool_connects(node: Node, tmp_path: Path) -> None:
    proc = subprocess.run(cli(node, tmp_path, "trust", "box", "--yes"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    c = PoolClient(node.pool)
    c.start()
    try:
        await c.wait_connected(30)
    finally:
        await c.close()
    again = subprocess.run(cli(node, tmp_path, "trust", "box", "--yes"), capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already has a key" in again.stderr


def test_cli_trust_refused_or_unreachable_is_one_line(node: Node, tmp_path: Path) -> None:
    no = subprocess.run(cli(node, tmp_path, "trust", "box"), input="n\n", capture_output=True, text=True, timeout=60)
    assert no.returncode == 1 and "not trusted" in no.stdout and not Path(node.pool.known_hosts or "").exists()
    node.sshd.kill()
    down = subprocess.run(cli(node, tmp_path, "trust", "box", "--yes"), capture_output=True, text=True, timeout=60)
    assert down.returncode == 1
    assert down.stderr.startswith(f"rbee-tui: error: cannot connect to 127.0.0.1:{node.port}")
    assert down.stderr.count("\n") == 1 and "Traceback" not in down.stderr
