"""A real OpenSSH server on 127.0.0.1, one per pool, with its own host key, config and authorized key."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def sshd_available() -> str | None:
    """None when a test sshd can run here, else why not."""
    if not Path(SSHD).exists():
        return "OpenSSH's sshd is not installed (bash scripts/install.sh --test installs openssh-server)"
    if not shutil.which("ssh-keygen"):
        return "ssh-keygen is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@dataclass
class Sshd:
    """One sshd: `start()`, `kill()` (the whole tree, as a dead machine), `freeze()`/`thaw()` (a silent link)."""

    root: Path
    client_key: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.host_key = self.root / "host_ed25519"
        if not self.host_key.exists():
            keygen(self.host_key)
        self.authorized = self.root / "authorized_keys"
        self.authorized.write_text(Path(f"{self.client_key}.pub").read_text())
        self.known_hosts = self.root / "known_hosts"
        pub = Path(f"{self.host_key}.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory

    def config(self) -> Path:
        cfg = self.root / "sshd_config"
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.authorized}",
            f"PidFile {self.root / 'sshd.pid'}",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "StrictModes no",
            "AllowTcpForwarding yes",
            "LogLevel ERROR",
            "ClientAliveInterval 0",
        ]
        # A login shell that runs `pyenv init` (some images' root .bashrc does) waits up to 60 s on pyenv's rehash
        # lock when a session killed mid-rehash left it behind, and the tests kill sessions on purpose (a pool
        # lost): give up on the rehash at once instead of stalling every later session.
        env = {"PYENV_REHASH_TIMEOUT": "0", **self.env}
        lines.append("SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()))
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    def start(self) -> Sshd:
        with open(self.root / "sshd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config())],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.root / 'sshd.log').read_text()[-500:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.02)
        raise RuntimeError("sshd did not start listening")

    def tree(self) -> list[psutil.Process]:
        """sshd and every process under it (sessions, remote commands), but not detached workers."""
        if self.proc is None:
            return []
        try:
            top = psutil.Process(self.proc.pid)
            return [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _signal_tree(self, sig: int) -> None:
        for p in reversed(self.tree()):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)

    def kill(self) -> None:
        """The machine dies: sshd and every session under it, at once."""
        self._signal_tree(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)
            self.proc = None

    def freeze(self) -> None:
        """The link goes silent: nothing answers, nothing is closed."""
        self._signal_tree(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_tree(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            self.thaw()
            self.kill()


def environment_for(home: Path, hub_url: str | None = None) -> dict[str, str]:
    """What a pool's remote commands see: their own XDG dirs (and the hub stand-in, when there is one)."""
    env = {
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_STATE_HOME": str(home / "state"),
        "XDG_DATA_HOME": str(home / "data"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if hub_url:
        env["HF_ENDPOINT"] = hub_url
    for d in ("config", "state", "data"):
        (home / d).mkdir(parents=True, exist_ok=True)
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env
