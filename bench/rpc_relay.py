"""`python -m bench.rpc_relay`: llama.cpp RPC direct, and through SSH port forwards (OpenSSH and asyncssh).

Everything runs on loopback: a test sshd (tests/support/sshd.py), one `ggml-rpc-server` per variant, and one
`llama-server --rpc <that variant's port> -ngl 99` coordinator per variant. The same prompt (token ids) goes to
each coordinator in turn, `--runs` rounds interleaved, and the medians of llama-server's own prompt and decode
tokens/s are printed. `--count` also tallies the RPC commands of one request from the server's debug log
(GGML_RPC_DEBUG=1), which is the round-trip count of the protocol. See docs/cluster.md for the findings.

Variants (pick with --variants):
  direct          the coordinator connects to ggml-rpc-server itself
  ssh-N           `ssh -N -L`: no session on the connection
  ssh-cmd         `ssh -L ... sleep`: the same forward on a connection that runs a command
  asyncssh        asyncssh forward_local_port on a connection that has run no command
  asyncssh-cmd    the same after one command ran on the connection (as a pool's connection has)
  asyncssh-nagle  asyncssh-cmd with TCP_NODELAY cleared on asyncssh's own socket
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("RBEE_BENCH_CACHE", Path.home() / ".cache" / "rbee" / "bench"))
VARIANTS = ("direct", "ssh-N", "ssh-cmd", "asyncssh", "asyncssh-cmd", "asyncssh-nagle")
SETTLE_S = 0.3  # llama.cpp's threads spin a little after a request; the next side starts on quiet cores
LOAD_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 180.0


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` until it is true, or fail saying what did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not happen within {timeout:.0f} s")


def port_open(port: int) -> bool:
    """True when something accepts on 127.0.0.1:port (the probe closes at once)."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def llama_bin() -> Path:
    """llama.cpp's tools, built (or found built) by scripts/build-llama-cpp.sh."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-llama-cpp.sh")], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def bench_model(n_layer: int, n_embd: int, n_ff: int) -> Path:
    """A generated f16 llama model, cached between runs."""
    from rbee_tui.tinymodel import TinySpec, write_model

    spec = TinySpec(
        name="rbee rpc relay", n_layer=n_layer, n_embd=n_embd, n_head=8, n_head_kv=4, n_ff=n_ff, n_ctx=4096, f16=True
    )
    path = CACHE / f"rpc-relay-{n_layer}x{n_embd}x{n_ff}.gguf"
    return path if path.exists() else write_model(path, spec)


class AsyncsshRelays:
    """asyncssh port forwards, each on its own connection, served by one event loop in a thread."""

    def __init__(self, port: int, key: Path, known_hosts: Path) -> None:
        self.port, self.key, self.known_hosts = port, key, known_hosts
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="asyncssh-relays", daemon=True)
        self.thread.start()
        self.conns: list[Any] = []

    def forward(self, target_port: int, run_command: bool, nagle: bool) -> int:
        """Open a connection and a local forward to 127.0.0.1:target_port; return the local port."""
        return asyncio.run_coroutine_threadsafe(self._forward(target_port, run_command, nagle), self.loop).result(60)

    async def _forward(self, target_port: int, run_command: bool, nagle: bool) -> int:
        import asyncssh

        conn = await asyncssh.connect(
            "127.0.0.1",
            port=self.port,
            username=getpass.getuser(),
            client_keys=[str(self.key)],
            known_hosts=str(self.known_hosts),
        )
        self.conns.append(conn)
        if run_command:
            await conn.run("true", check=True)
        if nagle:
            # asyncssh sets TCP_NODELAY on its socket (asyncssh/connection.py, connection_made); undo it
            conn.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        listener = await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", target_port)
        return listener.get_port()

    def close(self) -> None:
        """Close every connection and stop the loop."""

        async def close_all() -> None:
            for conn in self.conns:
                conn.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.wait_closed(), 5)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Bench:
    """The processes of one run; every one of them is stopped by `close`, by its own pid."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="rbee-rpc-relay-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sshd: Any = None
        self.async_relays: AsyncsshRelays | None = None
        self.bin = Path(args.bin) if args.bin else llama_bin()
        self.servers: dict[str, int] = {}  # variant -> llama-server port
        self.rpc_logs: dict[str, Path] = {}

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_sshd(self) -> None:
        from tests.support.sshd import Sshd, keygen, sshd_available

        why = sshd_available()
        if why:
            raise RuntimeError(why)
        self.key = keygen(self.work / "key")
        self.sshd = Sshd(self.work / "sshd", self.key).start()

    def ssh_forward(self, target_port: int, session: bool) -> int:
        """`ssh -L` to the test sshd: with -N, or running a long `sleep` as a session."""
        local = free_port()
        argv = ["ssh", "-L", f"{local}:127.0.0.1:{target_port}", "-i", str(self.key), "-p", str(self.sshd.port)]
        argv += ["-o", f"UserKnownHostsFile={self.sshd.known_hosts}", "-o", "BatchMode=yes"]
        argv += ["-o", "ExitOnForwardFailure=yes"] + ([] if session else ["-N"])
        argv += [f"{getpass.getuser()}@127.0.0.1"] + (["sleep", "86400"] if session else [])
        self.spawn(argv, self.work / f"ssh-{local}.log")
        wait_for(lambda: port_open(local), 30, f"ssh forward to {target_port}")
        return local

    def relay(self, variant: str, rpc_port: int) -> int:
        """The port the coordinator of `variant` should name in --rpc."""
        if variant == "direct":
            return rpc_port
        if variant.startswith("ssh-"):
            return self.ssh_forward(rpc_port, session=variant == "ssh-cmd")
        if self.async_relays is None:
            self.async_relays = AsyncsshRelays(self.sshd.port, self.key, self.sshd.known_hosts)
        return self.async_relays.forward(rpc_port, run_command=variant != "asyncssh", nagle=variant.endswith("nagle"))

    def start(self, variants: list[str]) -> None:
        """One ggml-rpc-server, relay and coordinator per variant, all loaded before any timing."""
        if any(v != "direct" for v in variants):
            self.start_sshd()
        t = str(self.args.threads)
        for variant in variants:
            rpc_port = free_port()
            env = dict(os.environ)
            if self.args.count and variant == "direct":
                env["GGML_RPC_DEBUG"] = "1"  # every command the server runs, one log line each
            self.rpc_logs[variant] = self.work / f"rpc-{variant}.log"
            self.spawn([str(self.bin / "ggml-rpc-server"), "-p", str(rpc_port), "-t", t], self.rpc_logs[variant], env)
            wait_for(lambda p=rpc_port: port_open(p), 30, f"ggml-rpc-server on {rpc_port}")
            via = self.relay(variant, rpc_port)
            port = free_port()
            argv = [str(self.bin / "llama-server"), "-m", str(self.args.model), "--host", "127.0.0.1"]
            argv += ["--port", str(port), "-t", t, "--rpc", f"127.0.0.1:{via}", "-ngl", "99"]
            argv += ["-c", str(self.args.ctx), "--fit", "off"]
            self.spawn(argv, self.work / f"server-{variant}.log")
            self.servers[variant] = port
        for variant, port in self.servers.items():
            wait_for(lambda p=port: _health(p), LOAD_TIMEOUT_S, f"{variant} coordinator loading the model")

    def request(self, variant: str, prompt: list[int], n_predict: int) -> dict[str, Any]:
        """One completion; llama-server's timings and text."""
        body = {"prompt": prompt, "n_predict": n_predict, "cache_prompt": False, "temperature": 0.0}
        body["ignore_eos"] = True
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.servers[variant]}/completion",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            out = json.load(resp)
        timings = out["timings"]
        return {
            "prompt_tps": timings["prompt_per_second"],
            "decode_tps": timings["predicted_per_second"],
            "wall_s": time.perf_counter() - t0,
            "text": out["content"],
        }

    def count_commands(self, prompt: list[int]) -> dict[str, Any]:
        """RPC commands (and their bytes) the server ran for one request, from its GGML_RPC_DEBUG log."""
        log = self.rpc_logs["direct"]
        before = len(log.read_text(errors="replace").splitlines())
        self.request("direct", prompt, self.args.gen)
        time.sleep(0.2)
        lines = log.read_text(errors="replace").splitlines()[before:]
        counts: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        for line in lines:
            m = re.match(r"\[(\w+)\]", line)
            if m:
                counts[m.group(1)] += 1
                size = re.search(r"size: (\d+)", line)
                sizes[m.group(1)] += int(size.group(1)) if size else 0
        return {"commands": dict(counts), "bytes": dict(sizes)}

    def close(self) -> None:
        """Stop every process this run started, newest first, by pid."""
        if self.async_relays is not None:
            self.async_relays.close()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self.sshd is not None:
            self.sshd.stop()


def _health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rpc_relay", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--runs", type=int, default=7, help="interleaved rounds (medians need >= 5)")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--gen", type=int, default=32, help="generated tokens")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1, help="threads of each ggml-rpc-server and llama-server")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--embd", type=int, default=512)
    ap.add_argument("--ff", type=int, default=1536)
    ap.add_argument("--model", help="a GGUF to use instead of the generated one")
    ap.add_argument("--bin", help="llama.cpp's bin directory (default: scripts/build-llama-cpp.sh finds it)")
    ap.add_argument("--count", action="store_true", help="tally the RPC commands of one request (direct)")
    ap.add_argument("--json", help="also write every sample to this file")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.count and "direct" not in variants:
        ap.error("--count needs the direct variant")
    args.model = Path(args.model) if args.model else bench_model(args.layers, args.embd, args.ff)
    from rbee_tui.cluster.layers import read_shape

    n_vocab = read_shape(args.model).n_vocab
    rng = random.Random(20251124)
    prompt = [rng.randrange(3, n_vocab) for _ in range(args.prompt)]  # past the control tokens

    bench = Bench(args)
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    try:
        bench.start(variants)
        for v in variants:  # warm-up: the first request of a coordinator pays for graph allocation
            bench.request(v, prompt, args.gen)
        for r in range(args.runs):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]  # rotate: no fixed slot
            for v in order:
                time.sleep(SETTLE_S)
                samples[v].append(bench.request(v, prompt, args.gen))
        counted = bench.count_commands(prompt) if args.count else None
    finally:
        bench.close()

    base = samples.get("direct")
    base_pp = statistics.median(s["prompt_tps"] for s in base) if base else None
    base_tg = statistics.median(s["decode_tps"] for s in base) if base else None
    texts = {s["text"] for v in variants for s in samples[v]}
    print(f"model {args.model.name}: prompt {args.prompt} tokens, {args.gen} generated, {args.runs} rounds")
    print(
        f"{'variant':<16}{'prompt t/s':>12}{'(min-max)':>16}{'ratio':>7}{'decode t/s':>12}{'(min-max)':>14}{'ratio':>7}"
    )
    for v in variants:
        pp = [s["prompt_tps"] for s in samples[v]]
        tg = [s["decode_tps"] for s in samples[v]]
        mp, mt = statistics.median(pp), statistics.median(tg)
        rp = f"{mp / base_pp:.2f}" if base_pp else "-"
        rt = f"{mt / base_tg:.2f}" if base_tg else "-"
        print(
            f"{v:<16}{mp:>12.0f}{f'({min(pp):.0f}-{max(pp):.0f})':>16}{rp:>7}"
            f"{mt:>12.0f}{f'({min(tg):.0f}-{max(tg):.0f})':>14}{rt:>7}"
        )
    print("same greedy text in every variant and run:", "yes" if len(texts) == 1 else f"no ({len(texts)} texts)")
    if counted:
        print("RPC commands of one request (server side):", json.dumps(counted["commands"], sort_keys=True))
        print("bytes by command:", json.dumps(counted["bytes"], sort_keys=True))
    if args.json:
        out = {"args": {k: str(v) for k, v in vars(args).items()}, "samples": samples, "commands": counted}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
