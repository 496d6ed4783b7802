"""A small Hugging Face hub stand-in (the `resolve` route with HEAD, GET and Range), started by tests and benches.

It serves files from memory or disk with the headers huggingface_hub reads (X-Repo-Commit, X-Linked-Etag as the
sha256, X-Linked-Size), counts every byte it sends, and can misbehave on purpose: slow down, cut a transfer
after N bytes, or refuse access.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    data: bytes | None = None
    path: Path | None = None
    sha256: str | None = None
    declared_size: int | None = None  # lie about the size (to serve a truncated file)

    def size(self) -> int:
        return len(self.data) if self.data is not None else self.path.stat().st_size  # type: ignore[union-attr]

    def read(self, start: int, end: int) -> bytes:
        if self.data is not None:
            return self.data[start:end]
        with open(self.path, "rb") as fh:  # type: ignore[arg-type]
            fh.seek(start)
            return fh.read(end - start)


@dataclass
class Request:
    method: str
    repo: str
    file: str
    range: str | None


@dataclass
class HubServer:
    files: dict[tuple[str, str], HubFile] = field(default_factory=dict)
    bytes_sent: int = 0
    requests: list[Request] = field(default_factory=list)
    throttle_bps: float | None = None
    cut_after: int | None = None  # cut the next GET after this many bytes (once)
    refuse: bool = False
    token: str | None = None  # when set, every request must carry `Authorization: Bearer <token>`
    chunk: int = 64 * 1024

    def add(self, repo: str, name: str, data: bytes | None = None, path: Path | None = None) -> HubFile:
        f = HubFile(data=data, path=path)
        h = hashlib.sha256()
        h.update(data if data is not None else path.read_bytes())  # type: ignore[union-attr]
        f.sha256 = h.hexdigest()
        self.files[(repo, name)] = f
        return f

    # -- server plumbing ---------------------------------------------------------------------------------

    def start(self) -> HubServer:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True, name="hub")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("hub server did not start")
        return self

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("HEAD", "/{owner}/{name}/resolve/{rev}/{file:.+}", self._handle)
        app.router.add_route("GET", "/{owner}/{name}/resolve/{rev}/{file:.+}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.set()
        self._loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def _down() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(_down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def gets(self) -> list[Request]:
        return [r for r in self.requests if r.method == "GET"]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        name = request.match_info["file"]
        self.requests.append(Request(request.method, repo, name, request.headers.get("Range")))
        if self.refuse or (self.token and request.headers.get("Authorization") != f"Bearer {self.token}"):
            return web.Response(status=401, headers={"X-Error-Code": "GatedRepo"}, text="gated")
        f = self.files.get((repo, name))
        if f is None:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound"}, text="not found")
        size = f.size()
        declared = f.declared_size if f.declared_size is not None else size
        headers = {
            "X-Repo-Commit": COMMIT,
            "X-Linked-Etag": f'"{f.sha256}"',
            "X-Linked-Size": str(declared),
            "ETag": f'"{f.sha256}"',
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            headers["Content-Length"] = str(declared)
            return web.Response(status=200, headers=headers)
        start, status = 0, 200
        rng = request.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{declared - 1}/{declared}"
        headers["Content-Length"] = str(declared - start)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        cut, self.cut_after = self.cut_after, None
        pos, sent = start, 0
        while pos < size:
            n = min(self.chunk, size - pos)
            if cut is not None and sent + n > cut:
                n = cut - sent
            if n > 0:
                await resp.write(f.read(pos, pos + n))
                pos += n
                sent += n
                self.bytes_sent += n
            if cut is not None and sent >= cut:
                request.transport.close()  # type: ignore[union-attr]
                return resp
            if self.throttle_bps:
                await asyncio.sleep(n / self.throttle_bps)
        if declared > size:
            request.transport.close()  # type: ignore[union-attr]
            return resp
        await resp.write_eof()
        return resp
