"""Which machines hold which layers of a model too big for one, and the llama-server arguments that say so.

A pure function of the model's shape and each node's free memory. The memory model follows llama.cpp (the
file:line references are to the llama.cpp vendored by llama-cpp-python; docs/cluster.md has the details):

- every node runs `ggml-rpc-server`; the coordinator (`llama-server --rpc ...`) runs on the first node of the
  placement. RPC devices come first in llama.cpp's device list, in `--rpc` order (src/llama.cpp:275-276).
- the token embeddings stay on the coordinator's CPU (src/llama-model.cpp:1603-1605); the repeating layers
  are cut into contiguous ranges by `--tensor-split`, and the output layer counts as one more layer that
  lands on the last device (src/llama-model.cpp:1589-1614).
- each layer's KV cache lives with the layer (src/llama-kv-cache.cpp:216-218): K and V of
  n_ctx x n_head_kv x head_dim elements each, n_ctx padded to 256 (src/llama-context.cpp:290); sliding-window
  layers keep min(n_ctx, window x slots + ubatch) cells (src/llama-kv-cache-iswa.cpp:73).
- every device also gets a compute buffer: see `compute_bytes` for the estimate.

The per-layer and per-buffer pieces (`kv_bytes`, `activation_bytes`, `mask_bytes`) are also the single-worker
memory model's (rbee_tui/capacity.py, docs/capacity.md): one memory model for one machine and for several.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rbee_tui.cluster.layers import ModelShape
from rbee_tui.errors import RbeeError

GB = 1_000_000_000
MiB = 1 << 20
RPC_PORT = 50052  # ggml-rpc-server's default port (tools/rpc/rpc-server.cpp:87)
UBATCH = 512  # llama.cpp's default physical batch (common/common.h:454)
SLOTS = 4  # llama-server's default: 4 slots sharing one unified KV cache (tools/server/server.cpp:156-159)
CTX_PAD = 256  # llama.cpp pads the context to a multiple of this (src/llama-context.cpp:290)
DEFAULT_MARGIN = 0.10  # of each node's free memory, left for the OS, page cache and everything else
PIPELINE_COPIES = 4  # copies of each split's inputs the scheduler keeps with pipeline parallelism (RPC devices)
RPC_SERVER_OVERHEAD = 64 * MiB  # the ggml-rpc-server process itself, and llama-server's on the coordinator
POLICIES = ("fewest", "spread")
# KV cache element types llama.cpp accepts for -ctk/-ctv: (elements per block, bytes per block).
KV_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q5_1": (32, 24),
    "q5_0": (32, 22),
    "q4_1": (32, 20),
    "q4_0": (32, 18),
    "iq4_nl": (32, 18),
}


def gb(n: int) -> str:
    """Bytes as people read free memory: '71 GB', '9.6 GB', '0.15 GB' (decimal, like the seeds' figures)."""
    if n >= 10 * GB:
        return f"{n / GB:.0f} GB"
    if n >= GB:
        return f"{n / GB:.1f} GB"
    return f"{n / GB:.2f} GB"


@dataclass(frozen=True)
class NodeFree:
    """A machine that can hold layers: its free memory now, and why it cannot, when it cannot."""

    name: str
    free_bytes: int
    down_reason: str = ""
    endpoint: str = ""  # host:port of its ggml-rpc-server; "<name>:50052" when empty
    limit_bytes: int | None = None  # the pool's own room (memory_budget/reserve, rbee_tui/capacity.py): no margin

    @property
    def up(self) -> bool:
        """True when the node can take layers."""
        return not self.down_reason

    @property
    def rpc_endpoint(self) -> str:
        """What `--rpc` names for this node."""
        return self.endpoint or f"{self.name}:{RPC_PORT}"

    def usable_bytes(self, margin: float) -> int:
        """Free memory less the margin kept free, or the pool's own room where its config sets one."""
        if self.limit_bytes is not None:
            return max(min(self.limit_bytes, self.free_bytes), 0)
        return int(max(self.free_bytes, 0) * (1.0 - margin))

    def why_down(self) -> str:
        """'node4 is down' or 'node4 is down (connection refused)'."""
        reason = self.down_reason.strip()
        return f"{self.name} is down" + ("" if reason in ("", "down") else f" ({reason})")


@dataclass(frozen=True)
class NodeShare:
    """One node's part of a placement: a contiguous range of layers and the memory it will hold."""

    node: NodeFree
    first_layer: int
    stop_layer: int  # one past the last layer
    weight_bytes: int
    kv_bytes: int
    compute_bytes: int
    usable_bytes: int
    coordinator: bool = False  # runs llama-server and holds the token embeddings
    output: bool = False  # holds the output layer

    @property
    def name(self) -> str:
        """The node's name."""
        return self.node.name

    @property
    def layers(self) -> range:
        """The repeating layers this node holds."""
        return range(self.first_layer, self.stop_layer)

    @property
    def total_bytes(self) -> int:
        """Everything this node will hold: weights, KV cache, compute buffers."""
        return self.weight_bytes + self.kv_bytes + self.compute_bytes

    @property
    def split(self) -> int:
        """This node's `--tensor-split` proportion: its layer count, plus one for the output layer."""
        return len(self.layers) + (1 if self.output else 0)


@dataclass(frozen=True)
class Placement:
    """Where each layer goes, what each node holds, and the llama-server arguments that make it so."""

    shares: tuple[NodeShare, ...]
    n_layer: int
    ctx: int
    kv_type: str
    policy: str
    margin: float
    left_out: tuple[str, ...] = field(default=())  # nodes given but not used, and why

    @property
    def distributed(self) -> bool:
        """True when more than one node takes part (llama-server runs with --rpc)."""
        return len(self.shares) > 1

    @property
    def tensor_split(self) -> tuple[int, ...]:
        """Integer proportions: layer counts, the last one including the output layer.

        llama.cpp cuts at cumulative fractions of n_layer + 1 with float arithmetic; integer counts make every
        cut land exactly on a layer boundary (see `layer_devices`).
        """
        return tuple(s.split for s in self.shares)

    @property
    def n_gpu_layers(self) -> int:
        """-ngl: every repeating layer plus the output layer on the RPC devices, none on the coordinator's CPU."""
        return self.n_layer + 1 if self.distributed else 0

    @property
    def needed_bytes(self) -> int:
        """Everything the nodes will hold together."""
        return sum(s.total_bytes for s in self.shares)

    def server_args(self) -> list[str]:
        """llama-server arguments (besides -m, --host, --port) for this placement."""
        args: list[str] = []
        if self.distributed:
            args += ["--rpc", ",".join(s.node.rpc_endpoint for s in self.shares)]
            args += ["--tensor-split", ",".join(str(n) for n in self.tensor_split)]
        args += ["-ngl", str(self.n_gpu_layers), "-c", str(self.ctx)]
        if self.kv_type != "f16":
            args += ["-ctk", self.kv_type, "-ctv", self.kv_type]
        # --fit is on by default and would load the model once more to measure it, then rewrite unset
        # arguments; ours are all set, so it could only cost time (common/common.cpp:1200, common/fit.cpp:463).
        args += ["--fit", "off"]
        return args

    def describe(self) -> str:
        """One line per node: layers and bytes."""
        lines = []
        for s in self.shares:
            roles = [r for r, on in (("coordinator", s.coordinator), ("output", s.output)) if on]
            extra = f" + {', '.join(roles)}" if roles else ""
            lines.append(
                f"{s.name}: layers {s.first_layer}-{s.stop_layer - 1}{extra}, "
                f"{gb(s.total_bytes)} of {gb(s.node.free_bytes)} free"
            )
        return "\n".join(lines + list(self.left_out))


class Refusal(RbeeError):
    """The model does not fit the nodes that are up: says what it needs and what there is."""

    def __init__(self, message: str, needed_bytes: int, free_bytes: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes


def kv_cells(shape: ModelShape, layer: int, ctx: int, seqs: int = SLOTS) -> int:
    """KV cache cells one layer allocates for a context of `ctx` tokens shared by `seqs` sequences."""
    full = _pad(ctx, CTX_PAD)
    if shape.is_swa(layer):
        return min(full, _pad(min(full, shape.sliding_window * seqs + UBATCH), CTX_PAD))
    return full


def kv_layer_bytes(shape: ModelShape, layer: int, ctx: int, kv_type: str = "f16", seqs: int = SLOTS) -> int:
    """K and V cache bytes of one layer: cells x n_head_kv x head_dim, for K and for V."""
    block, block_bytes = KV_TYPES[kv_type]
    heads = shape.kv_heads(layer)
    row_k = -(-heads * shape.head_dim_k // block) * block_bytes
    row_v = -(-heads * shape.head_dim_v // block) * block_bytes
    return kv_cells(shape, layer, ctx, seqs) * (row_k + row_v)


def kv_bytes(shape: ModelShape, ctx: int, kv_type: str = "f16", seqs: int = SLOTS) -> int:
    """K and V cache bytes of every layer of a model for a context of `ctx` tokens."""
    return sum(kv_layer_bytes(shape, il, ctx, kv_type, seqs) for il in range(shape.n_layer))


def activation_bytes(shape: ModelShape, ubatch: int = UBATCH) -> int:
    """The widest point of one layer's graph for a ubatch: four f32 vectors of n_embd and three of n_ff per token
    (the FFN's gate, up and product beside the residual stream). Fitted to what llama.cpp logs as its compute
    buffer for generated models of widths 64 to 1024 (docs/capacity.md, docs/cluster.md)."""
    return 4 * ubatch * (4 * shape.n_embd + 3 * shape.n_ff)


def mask_bytes(ctx: int, copies: int = 1, ubatch: int = UBATCH) -> int:
    """The attention mask: f16, one row of KV cells per ubatch token, in `copies` copies (4 with pipeline
    parallelism over several devices, ggml/src/ggml-backend.cpp:771-772)."""
    return 2 * copies * ubatch * _pad(ctx, CTX_PAD)


def compute_bytes(shape: ModelShape, ctx: int, output: bool) -> int:
    """Estimated compute buffer of one RPC device, which llama.cpp sizes for a full ubatch of 512 tokens.

    Fitted to what llama-server logs (`sched_reserve: ... compute buffer size`) for generated models of several
    widths and contexts (docs/cluster.md): five f32 vectors of n_embd and three of n_ff per token of the ubatch,
    8 bytes per token and KV cell for the attention mask, up to 2 MiB besides; on the output device the f32 logits
    of every token of the ubatch. Flash attention is on for RPC devices (they claim every op,
    ggml/src/ggml-rpc/ggml-rpc.cpp:2216-2221), so no n_head x n_ctx score matrix is counted.
    """
    # The inputs copied between devices: one more f32 vector of n_embd per ubatch token than one device needs.
    activations = activation_bytes(shape) + 4 * UBATCH * shape.n_embd
    mask = mask_bytes(ctx, PIPELINE_COPIES)
    logits = 4 * UBATCH * shape.n_vocab if output else 0
    # What is left beyond activations and mask: 2 MiB from n_embd 512 up (nine logged models), but only
    # 0.17 MiB at n_embd 64; two more f32 vectors of n_embd per ubatch token, capped at 2 MiB, fits both.
    rest = min(2 * MiB, 4 * UBATCH * (2 * shape.n_embd + 20))
    return activations + mask + logits + rest + RPC_SERVER_OVERHEAD


def coordinator_bytes(shape: ModelShape, ctx: int) -> int:
    """What the coordinator holds besides its node's layers: token embeddings, its CPU compute buffer, logits."""
    host = 4 * UBATCH * 5 * shape.n_embd + mask_bytes(ctx, PIPELINE_COPIES) + 4 * SLOTS * (shape.n_vocab + shape.n_embd)
    return shape.input_bytes + host + RPC_SERVER_OVERHEAD


def plan(
    shape: ModelShape,
    nodes: Sequence[NodeFree],
    ctx: int,
    kv_type: str = "f16",
    policy: str = "fewest",
    margin: float = DEFAULT_MARGIN,
) -> Placement:
    """Place `shape` on `nodes` (in their order) for a context of `ctx` tokens, or raise Refusal saying why not.

    policy "fewest" uses as few nodes as fit, the ones with the most free memory (every extra node adds a
    network hop per token); "spread" uses every node that is up, layers in proportion to free memory.
    """
    if policy not in POLICIES:
        raise RbeeError(f"unknown placement policy {policy!r}", "use fewest or spread")
    if kv_type not in KV_TYPES:
        raise RbeeError(f"unknown KV cache type {kv_type!r}", f"use one of {', '.join(KV_TYPES)}")
    if ctx < 1:
        raise RbeeError(f"context size must be at least 1 token, not {ctx}")
    if not 0.0 <= margin < 1.0:
        raise RbeeError(f"margin must be a fraction of free memory in [0, 1), not {margin}")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise RbeeError("two nodes have the same name", ", ".join(names))
    up = [n for n in nodes if n.up]
    down = [n.why_down() for n in nodes if not n.up]
    model = _Costs(shape, ctx, kv_type)
    if not up:
        raise Refusal("no node is up" + (f": {'; '.join(down)}" if down else ""), model.need(1), 0)

    if policy == "spread":
        candidates = [up]
    else:
        by_free = sorted(up, key=lambda n: -n.free_bytes)  # stable: ties keep the given order
        candidates = [[n for n in up if n in by_free[:k]] for k in range(1, len(up) + 1)]
    for chosen in candidates:
        shares = _assign(model, chosen, margin)
        if shares is not None:
            used = {s.name for s in shares}
            left = [
                f"{n.name}: {'no room for a layer' if n in chosen else 'not needed'}" for n in up if n.name not in used
            ]
            return Placement(tuple(shares), shape.n_layer, ctx, kv_type, policy, margin, tuple(left + down))
    raise _refusal(model, up, down, margin)


class _Costs:
    """Per-layer and per-node byte counts for one model and context."""

    def __init__(self, shape: ModelShape, ctx: int, kv_type: str) -> None:
        self.shape = shape
        self.ctx = ctx
        self.kv = [kv_layer_bytes(shape, il, ctx, kv_type) for il in range(shape.n_layer)]
        self.layer = [w + kv for w, kv in zip(shape.layer_bytes, self.kv, strict=True)]

    def fixed_weights(self, first: bool, last: bool) -> int:
        """Weights a node holds besides its layers: shared tensors, token embeddings, the output layer."""
        s = self.shape
        return s.shared_bytes + (s.input_bytes if first else 0) + (s.output_bytes if last else 0)

    def fixed_compute(self, first: bool, last: bool) -> int:
        """Buffers a node holds besides its layers: its compute buffer, and the coordinator's."""
        s = self.shape
        return compute_bytes(s, self.ctx, last) + (coordinator_bytes(s, self.ctx) - s.input_bytes if first else 0)

    def fixed(self, first: bool, last: bool) -> int:
        """Bytes a node holds whatever its layer count."""
        return self.fixed_weights(first, last) + self.fixed_compute(first, last)

    def need(self, n_nodes: int) -> int:
        """Bytes the model needs over `n_nodes` nodes: layers, KV cache, and every node's fixed part."""
        return sum(self.layer) + sum(self.fixed(i == 0, i == n_nodes - 1) for i in range(n_nodes))


def _assign(model: _Costs, chosen: list[NodeFree], margin: float) -> list[NodeShare] | None:
    """Contiguous layer ranges over `chosen` in order: proportional to room, else filled greedily."""
    for cuts in (_proportional(model, chosen, margin), _greedy(model, chosen, margin)):
        shares = _shares(model, chosen, cuts, margin) if cuts else None
        if shares is not None:
            return shares
    return None


def _proportional(model: _Costs, chosen: list[NodeFree], margin: float) -> list[int] | None:
    """Cut points giving each node a share of the layer bytes in proportion to its room for layers."""
    n = len(chosen)
    room = [max(node.usable_bytes(margin) - model.fixed(i == 0, i == n - 1), 0) for i, node in enumerate(chosen)]
    total_room = sum(room)
    if total_room <= 0:
        return None
    total = sum(model.layer)
    cuts: list[int] = []
    acc = il = seen = 0
    for r in room[:-1]:
        seen += r
        target = total * seen / total_room
        # whole layers, rounding to the nearest cut
        while il < len(model.layer) and acc + model.layer[il] / 2 <= target:
            acc += model.layer[il]
            il += 1
        cuts.append(il)
    return [*cuts, len(model.layer)]


def _greedy(model: _Costs, chosen: list[NodeFree], margin: float) -> list[int] | None:
    """Cut points filling each node in order as far as it goes; the node taking the last layer gets the output."""
    cuts: list[int] = []
    il, n_layer = 0, len(model.layer)
    for node in chosen:
        first = il == 0
        usable = node.usable_bytes(margin)
        if model.fixed(first, True) + sum(model.layer[il:]) <= usable:
            return cuts + [n_layer] * (len(chosen) - len(cuts))
        budget = usable - model.fixed(first, False)
        while il < n_layer - 1 and budget >= model.layer[il]:  # leave at least one layer for a later node
            budget -= model.layer[il]
            il += 1
        cuts.append(il)
    return None


def _shares(model: _Costs, chosen: list[NodeFree], cuts: list[int], margin: float) -> list[NodeShare] | None:
    """NodeShares for the cut points, leaving out nodes with no layers; None when any node would overflow."""
    ranges = []
    start = 0
    for node, stop in zip(chosen, cuts, strict=True):
        if stop > start:
            ranges.append((node, start, stop))
        start = stop
    shares = []
    for i, (node, a, b) in enumerate(ranges):
        first, last = i == 0, i == len(ranges) - 1
        weights = sum(model.shape.layer_bytes[a:b]) + model.fixed_weights(first, last)
        compute = model.fixed_compute(first, last)
        share = NodeShare(node, a, b, weights, sum(model.kv[a:b]), compute, node.usable_bytes(margin), first, last)
        if share.total_bytes > share.usable_bytes:
            return None
        shares.append(share)
    return shares


def _refusal(model: _Costs, up: list[NodeFree], down: list[str], margin: float) -> Refusal:
    need = model.need(len(up))
    free = sum(n.free_bytes for n in up)
    usable = sum(n.usable_bytes(margin) for n in up)
    plural = "node" if len(up) == 1 else "nodes"
    msg = f"needs {gb(need)}, {gb(free)} free across {len(up)} {plural}"
    if down:
        msg += "; " + "; ".join(down)
    if need <= usable:
        msg += f"; no arrangement of whole layers fits (the largest layer with its KV cache: {gb(max(model.layer))})"
    limited = [n.name for n in up if n.limit_bytes is not None]
    kept = f"keeping {margin:.0%} of each node free" if not limited else "each pool's memory_budget/reserve"
    if limited and len(limited) < len(up):
        kept += f" ({', '.join(limited)}) and {margin:.0%} of the others' free memory"
    hint = f"{gb(usable)} usable after {kept}; add a node or use a shorter context"
    return Refusal(msg, need, free, hint)


def layer_devices(tensor_split: Sequence[float], n_layer: int, n_gpu_layers: int) -> list[int]:
    """The device index llama.cpp gives each layer (and, last, the output layer); -1 is the coordinator's CPU.

    A transcription of src/llama-model.cpp:1579-1600, float32 arithmetic included, so a placement's
    `--tensor-split` can be checked to cut where the plan says.
    """
    splits = [_f32(x) for x in tensor_split]
    acc = _f32(0.0)
    for i, x in enumerate(splits):
        acc = _f32(acc + x)
        splits[i] = acc
    splits = [_f32(x / acc) for x in splits]
    i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0)
    act = min(n_gpu_layers, n_layer + 1) if splits else 0
    out = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or (il - i_gpu_start) >= act:
            out.append(-1)
            continue
        value = _f32(_f32(il - i_gpu_start) / act)
        out.append(next((j for j, s in enumerate(splits) if s > value), len(splits)))  # std::upper_bound
    return out


def _f32(x: float) -> float:
    import struct

    return struct.unpack("f", struct.pack("f", x))[0]


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to
