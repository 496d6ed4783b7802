"""A counting TCP relay on this machine: the bytes a coordinator and one node's rpc-server send each other.

A cluster's SSH relays pass every byte of a node's RPC link through this machine; putting this in front of
the node's local forward counts them exactly, per direction, without asking the nodes. It is one more loopback
hop, so a cluster only meters when asked (the matrix does; `rbee-tui cluster spawn` does not).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass

CHUNK = 1 << 16


@dataclass
class Counts:
    """Bytes so far: to the node (the coordinator's requests, the weights at load) and from it (results)."""

    to_node: int = 0
    from_node: int = 0

    @property
    def total(self) -> int:
        """Both directions."""
        return self.to_node + self.from_node

    def since(self, before: Counts) -> Counts:
        """What moved after `before`."""
        return Counts(self.to_node - before.to_node, self.from_node - before.from_node)


class Meter:
    """Listens on 127.0.0.1, relays each connection to 127.0.0.1:`target` and counts what passes."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.counts = Counts()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        """Listen on a free port; return it."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def snapshot(self) -> Counts:
        """The counts now (a copy)."""
        return Counts(self.counts.to_node, self.counts.from_node)

    def close(self) -> None:
        """Stop listening and cut the connections (like the SSH listeners it sits with)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            self._writers.discard(writer)
            writer.close()
            return
        self._writers.add(up_writer)
        for w in (writer, up_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:  # RPC is many small request/answer messages: Nagle would hold each one back
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(self._pump(reader, up_writer, True), self._pump(up_reader, writer, False))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, to_node: bool) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(CHUNK):
                if to_node:
                    self.counts.to_node += len(chunk)
                else:
                    self.counts.from_node += len(chunk)
                writer.write(chunk)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            writer.write_eof()
