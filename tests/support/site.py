"""Two SSH pools on one machine: two sshd on loopback, each pool with its own home and models dir."""

from __future__ import annotations

import getpass
from pathlib import Path

from rbee_tui.config import PoolConfig
from tests.conftest import BIN, hive_cmd
from tests.support.cleanup import kill_workers
from tests.support.hub import HubServer
from tests.support.sshd import Sshd, environment_for, keygen


class Site:
    """Two SSH pools (two sshd on loopback), each with its own home and models dir."""

    def __init__(self, root: Path, hub: HubServer) -> None:
        self.root = root
        self.key = keygen(root / "client_key")
        self.sshd: dict[str, Sshd] = {}
        self.pools: dict[str, PoolConfig] = {}
        hive = str(BIN / "rbee-hive") if (BIN / "rbee-hive").exists() else " ".join(hive_cmd())
        for name in ("pool-a", "pool-b"):
            sshd = Sshd(root / name, self.key, env=environment_for(root / f"home-{name}", hub.url)).start()
            self.sshd[name] = sshd
            self.pools[name] = PoolConfig(
                name=name,
                transport="ssh",
                host="127.0.0.1",
                port=sshd.port,
                user=getpass.getuser(),
                identity_file=str(self.key),
                known_hosts=str(sshd.known_hosts),
                models_dir=str(root / f"home-{name}" / "models"),
                hive_command=hive,
            )

    def stop(self) -> None:
        for s in self.sshd.values():
            s.stop()
        kill_workers(self.root)  # workers on a pool whose sshd died are detached: they outlive it by design
