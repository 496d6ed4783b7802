"""The memory one worker needs (weights, KV cache, compute buffers, the process itself) and the room a node has
for it: one model for a spawn, a matrix cell, a packing step and the dashboard's spawn dialog.

Pure and node-side safe. The per-layer and per-buffer functions are the cluster planner's
(rbee_tui/cluster/planner.py), so a model split over machines and a model on one are sized the same way;
docs/capacity.md derives every constant from what the workers measurably hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rbee_tui.cluster.layers import ModelShape
from rbee_tui.cluster.planner import DEFAULT_MARGIN, GB, UBATCH, MiB, activation_bytes, gb, kv_bytes, mask_bytes
from rbee_tui.errors import RbeeError
from rbee_tui.sample import Sample
from rbee_tui.worker.client import ENGINE_EMBEDDED, ENGINE_SERVER, ENGINES

DEFAULT_CTX = 4096  # a worker's context when none is asked for: the model's own, at most this (hive/workers.py)
# What a worker's processes hold besides llama.cpp's buffers (docs/capacity.md, "Overhead"): the Python
# interpreter with llama-cpp-python, numpy and aiohttp for the embedded engine; the worker's proxy (Python,
# aiohttp) plus llama-server's own code, threads and heap for the llama-server engine. Measured on CPU workers
# as RSS after a full-ubatch prompt less weights, KV cache, compute and output buffers.
ENGINE_OVERHEAD = {ENGINE_EMBEDDED: 63 * MiB, ENGINE_SERVER: 60 * MiB}
VOCAB_BYTES = 170  # per vocabulary token: llama.cpp's vocabulary (token text, scores, lookup maps), both engines
# A CUDA worker's context, cuBLAS workspace and kernels on its GPU: an allowance, not measured here (no GPU).
CUDA_OVERHEAD = 400 * MiB
MB = 1_000_000
POS_BYTES = 20  # per ubatch token besides the activations: positions, output ids, KV indices (fitted)


def size(n: int) -> str:
    """Bytes as people read memory: '5.1 GB' from 1 GB up (as the planner prints), else '69 MB', '504 KB'."""
    if n >= GB:
        return gb(n)
    if n >= 10 * MB:
        return f"{n / MB:.0f} MB"
    if n >= MB:
        return f"{n / MB:.1f} MB"
    return f"{n / 1000:.0f} KB"


@dataclass(frozen=True)
class MemoryPrediction:
    """What one worker will hold once it has served a prompt of a full ubatch: on the CPU, its processes' RSS;
    on a GPU, the VRAM it takes (the token embeddings and the process stay in RAM)."""

    weights: int
    kv: int
    compute: int
    overhead: int
    ctx: int
    device: str = "cpu"
    engine: str = ENGINE_SERVER

    @property
    def total(self) -> int:
        """Everything together."""
        return self.weights + self.kv + self.compute + self.overhead

    def describe(self) -> str:
        """'273 MB: weights 180 MB, KV cache 8.4 MB at 4096 tokens, compute 30 MB, runtime 66 MB'."""
        where = " of GPU memory" if self.device != "cpu" else ""
        return (
            f"{size(self.total)}{where}: weights {size(self.weights)}, KV cache {size(self.kv)} at {self.ctx} "
            f"tokens, compute {size(self.compute)}, runtime {size(self.overhead)}"
        )

    def to_json(self) -> dict[str, Any]:
        """The prediction as the catalog's `memory` object and the matrix's measurements carry it."""
        return {
            "weights": self.weights,
            "kv": self.kv,
            "compute": self.compute,
            "overhead": self.overhead,
            "total": self.total,
            "ctx": self.ctx,
            "device": self.device,
            "engine": self.engine,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> MemoryPrediction:
        """The prediction `to_json` wrote (total is derived, so it is not read back)."""
        return cls(
            weights=int(doc["weights"]),
            kv=int(doc["kv"]),
            compute=int(doc["compute"]),
            overhead=int(doc["overhead"]),
            ctx=int(doc["ctx"]),
            device=str(doc.get("device", "cpu")),
            engine=str(doc.get("engine", ENGINE_SERVER)),
        )


def default_ctx(trained: int | None) -> int:
    """The context a worker gets when none is asked for: the model's training context, at most DEFAULT_CTX."""
    return min(int(trained or DEFAULT_CTX), DEFAULT_CTX)


def predict_worker(
    shape: ModelShape, ctx: int, backend: str = "cpu", parallel: int = 1, engine: str = ENGINE_SERVER
) -> MemoryPrediction:
    """The memory a worker of `shape` with a context of `ctx` tokens will hold on `backend`.

    Weights are the file's tensor bytes (a tied output matrix is counted once: on the CPU llama.cpp uses the
    mapped embeddings for both). The KV cache is f16 for every layer, sliding-window layers kept short. Compute is
    llama.cpp's buffer for a ubatch of min(512, ctx) tokens: the widest layer's activations, the f16 attention
    mask over every KV cell, and the f32 logits of one output per slot (neither engine asks for more: the buffer
    llama-cpp-python reserves for 512 rows of logits is never touched, so it is not counted). `parallel` slots
    share the one KV cache (llama-server's default, kv_unified); each gets its own output row.
    """
    if ctx < 1:
        raise RbeeError(f"context size must be at least 1 token, not {ctx}")
    if parallel < 1:
        raise RbeeError(f"parallel must be at least 1, not {parallel}")
    if engine not in ENGINES:
        raise RbeeError(f"unknown engine {engine!r}", f"choose from {', '.join(ENGINES)}")
    ubatch = min(UBATCH, ctx)
    compute = (
        activation_bytes(shape, ubatch)
        + POS_BYTES * ubatch
        + mask_bytes(ctx, 1, ubatch)
        + 2 * 4 * parallel * shape.n_vocab  # the graph's logits and the output buffer they are copied to
    )
    kv = kv_bytes(shape, ctx, "f16", parallel)
    if backend == "cpu":
        weights = shape.weight_bytes - (shape.output_bytes if shape.tied_output else 0)
        overhead = ENGINE_OVERHEAD[engine] + VOCAB_BYTES * shape.n_vocab
        return MemoryPrediction(weights, kv, compute, overhead, ctx, "cpu", engine)
    # Offloaded: every layer and the output on the GPU; the token embeddings stay on the CPU
    # (src/llama-model.cpp:1603-1605) and a tied output is a second copy there (TENSOR_DUPLICATED).
    weights = shape.weight_bytes - shape.input_bytes
    return MemoryPrediction(weights, kv, compute, CUDA_OVERHEAD, ctx, backend, engine)


def free_for_workers(available: int, total: int, budget: int | None, reserve: int | None, used_by_workers: int) -> int:
    """What a new worker may use on a node, in bytes (never below 0).

    With a `budget` (memory_budget), the pool's workers may use that much in all: the budget less what its
    workers use now. With a `reserve`, that much of the node's memory stays free: available less the reserve.
    Both set: the smaller. Neither: available less a margin (DEFAULT_MARGIN, the planner's, kept for the OS
    and the page cache). However generous a budget, a worker never gets more than the node has available.
    """
    rooms = []
    if budget is not None:
        rooms.append(min(budget - used_by_workers, available))
    if reserve is not None:
        rooms.append(available - reserve)
    if not rooms:
        rooms.append(int(available * (1.0 - DEFAULT_MARGIN)))
    # `total` is not needed for these rules (the margin is of what is available, as the planner's is); it is in
    # the signature so a rule of the machine's size can come without changing every caller.
    return max(min(rooms), 0)


def room_note(budget: int | None, reserve: int | None) -> str:
    """How the room was worked out, for a hint: 'memory_budget 4.0 GB', 'reserve 2.0 GB' or the default."""
    parts = []
    if budget is not None:
        parts.append(f"memory_budget {size(budget)} less what its workers use")
    if reserve is not None:
        parts.append(f"reserve {size(reserve)} kept free")
    return "; ".join(parts) or f"{DEFAULT_MARGIN:.0%} of available memory kept free"


class WontFit(RbeeError):
    """A worker (or a matrix cell, or a packing step) whose predicted memory exceeds what its pool has free."""

    KIND = "wont_fit"  # the `kind` of its --json error, so the pool client raises it again as a WontFit

    def __init__(self, needed_bytes: int, free_bytes: int, pool: str, hint: str | None = None, what: str = "") -> None:
        prefix = f"{what} " if what else ""
        super().__init__(f"{prefix}needs {size(needed_bytes)}, {size(free_bytes)} free on {pool}", hint)
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes
        self.pool = pool

    def to_json(self) -> dict[str, Any]:
        """The error with its numbers, as `rbee-hive --json` prints it."""
        return {
            **super().to_json(),
            "kind": self.KIND,
            "needed_bytes": self.needed_bytes,
            "free_bytes": self.free_bytes,
            "pool": self.pool,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> WontFit:
        """The error a node printed, as a WontFit again (its message kept as the node wrote it)."""
        err = cls(int(doc["needed_bytes"]), int(doc["free_bytes"]), str(doc.get("pool", "")), doc.get("hint"))
        err.message = str(doc.get("error") or err.message)
        err.args = (err.message,)
        return err


def check_fits(prediction: MemoryPrediction, free: int, pool: str, hint: str | None = None, what: str = "") -> None:
    """Raise WontFit when `prediction` needs more than `free` bytes."""
    if prediction.total > free:
        raise WontFit(prediction.total, free, pool, hint, what)


def room_from_sample(sample: Sample, budget: int | None, reserve: int | None) -> int:
    """What a new worker may use on a pool, from the pool's last metrics sample (the dashboard's and the
    matrix's view; the node decides again at spawn, from its own readings)."""
    used = sum(w.rss_bytes or 0 for w in sample.workers if w.alive)
    return free_for_workers(sample.ram.available, sample.ram.total, budget, reserve, used)


class MemoryWatch:
    """A matrix cell's memory as its pool's samples show it: the node's RAM in use before the worker and at its
    highest, and the swap traffic (bytes swapped in and out) while the cell ran."""

    def __init__(self) -> None:
        self.ram_used_start: int | None = None
        self.ram_used_peak = 0
        self._swap_start: int | None = None
        self._swap_last: int | None = None

    def observe(self, sample: Sample) -> None:
        """Take one sample of the cell's pool into account."""
        if self.ram_used_start is None:
            self.ram_used_start = sample.ram.used
        self.ram_used_peak = max(self.ram_used_peak, sample.ram.used)
        if sample.swap.sin is not None and sample.swap.sout is not None:
            moved = sample.swap.sin + sample.swap.sout
            if self._swap_start is None:
                self._swap_start = moved
            self._swap_last = moved

    def measurements(
        self, prediction: dict[str, Any] | None, rss_loaded: int | None, peak_rss: int, peak_vram: int, device: str
    ) -> dict[str, Any]:
        """Predicted against measured, for a cell's measurements (the matrix store and its exports).

        `prediction` is the catalog's `memory` object. The overhead beyond the weights is what the worker held
        at its highest (RSS on the CPU, VRAM on a GPU) less the weights the prediction counts.
        """
        out: dict[str, Any] = {"rss_loaded": rss_loaded}
        if self.ram_used_start is not None:
            out["ram_used_delta"] = max(self.ram_used_peak - self.ram_used_start, 0)
        swap = None if self._swap_start is None or self._swap_last is None else self._swap_last - self._swap_start
        out["swap_in_out_bytes"] = swap
        out["swapped"] = bool(swap)
        if prediction:
            on_gpu = device != "cpu"
            predicted = int(prediction.get("vram") or 0) if on_gpu else int(prediction["total"])
            measured = peak_vram if on_gpu else peak_rss
            out["predicted_bytes"] = predicted or None
            if measured and not on_gpu:
                out["overhead_bytes"] = measured - int(prediction["weights"])
        return out


def refusal(
    memory: dict[str, Any] | None,
    sample: Sample | None,
    budget: int | None,
    reserve: int | None,
    pool: str,
    backend: str = "cpu",
    gpu: int = 0,
    what: str = "",
) -> WontFit | None:
    """The WontFit a worker of this catalog `memory` object would meet on a pool whose last sample is `sample`
    (None when it fits, or when there is no prediction or no sample to judge by: the node judges at spawn)."""
    if not memory or sample is None:
        return None
    if backend == "cpu":
        need, free = int(memory["total"]), room_from_sample(sample, budget, reserve)
        hint = room_note(budget, reserve)
    else:
        card = next((g for g in sample.gpus if g.index == gpu), None)
        if card is None or card.memory_free is None or not memory.get("vram"):
            return None
        need, free = int(memory["vram"]), int(card.memory_free * (1.0 - DEFAULT_MARGIN))
        hint = f"GPU {gpu}, {DEFAULT_MARGIN:.0%} of its free memory kept free"
    return WontFit(need, max(free, 0), pool, f"room: {hint}", what) if need > free else None
