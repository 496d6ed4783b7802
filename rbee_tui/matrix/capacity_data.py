"""The capacity results as plain data for the views: each cell's concurrency sweep and memory, and the stored
packings, read once from a job's measurements and a run's packing rows (shapes: docs/capacity.md). No UI imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rbee_tui.config import concurrency_levels


def parse_levels(text: str) -> tuple[int, ...]:
    """Concurrency levels typed as "1,2,4" (sorted, each once); empty text: no sweep."""
    return concurrency_levels(text, "concurrency") if text.strip() else ()


@dataclass(frozen=True)
class SweepLevel:
    """One concurrency level of a cell's sweep: N streams at once against its worker."""

    level: int
    streams_ok: int
    aggregate_tps: float
    per_stream_tps: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    engine: str
    parallel: int


@dataclass(frozen=True)
class CellCapacity:
    """What a cell measured for the capacity view: its sweep, and its memory predicted and measured."""

    key: str
    state: str = field(compare=False)  # a state change alone draws nothing new
    levels: tuple[SweepLevel, ...] = ()
    predicted_bytes: int | None = None
    measured_bytes: int | None = None

    @property
    def gain(self) -> float | None:
        """Aggregate tokens/s at the highest level against its own at level 1 (what batching buys)."""
        one = next((lv for lv in self.levels if lv.level == 1), None)
        top = max(self.levels, key=lambda lv: lv.level, default=None)
        if one is None or top is None or top.level == 1 or not one.aggregate_tps:
            return None
        return top.aggregate_tps / one.aggregate_tps


@dataclass(frozen=True)
class PackedWorker:
    """One worker of a packing: its speed alone and with the others."""

    model: str
    alone_tps: float | None
    together_tps: float | None

    @property
    def slowdown(self) -> float | None:
        """How many times slower it ran with the others (1.0: not at all)."""
        if not self.alone_tps or not self.together_tps:
            return None
        return self.alone_tps / self.together_tps


@dataclass(frozen=True)
class Packing:
    """A packing result: how many workers fit on a pool, and how fast they were together."""

    run_id: int | None
    pool: str
    models: tuple[str, ...]
    predicted_count: int
    started: int
    refused: str
    workers: tuple[PackedWorker, ...]
    # Each step: the number of workers on the pool then, and each one's speed with the others.
    steps: tuple[tuple[int, tuple[PackedWorker, ...]], ...] = ()
    ram_used_peak: int | None = None
    swap_used_peak: int | None = None
    temps_peak_c: float | None = None
    cpu_freq_mhz: tuple[float, float] | None = None  # idle, lowest under load: a drop is throttling
    gpu_clock_mhz: tuple[tuple[str, float, float], ...] = ()  # per GPU: index, idle, lowest under load

    def slowdowns(self) -> dict[int, dict[str, float]]:
        """Mean slowdown per model at each number of co-resident workers (the final state when no steps were
        recorded)."""
        out: dict[int, dict[str, float]] = {}
        for count, workers in self.steps or ((self.started, self.workers),):
            by_model: dict[str, list[float]] = {}
            for w in workers:
                if w.slowdown is not None:
                    by_model.setdefault(w.model, []).append(w.slowdown)
            if by_model:
                out[count] = {m: sum(v) / len(v) for m, v in by_model.items()}
        return out


@dataclass(frozen=True)
class Capacity:
    """Everything the capacity view draws: per cell its sweep and memory, and the packing results."""

    run_id: int | None = None
    stored: bool = False  # read back from the store (a finished run), not the board's own run
    cells: tuple[CellCapacity, ...] = ()
    packings: tuple[Packing, ...] = ()

    def cell(self, key: str) -> CellCapacity | None:
        """A cell's entry, if it measured anything the view draws."""
        return next((c for c in self.cells if c.key == key), None)

    @property
    def swept(self) -> tuple[CellCapacity, ...]:
        """The cells with at least one concurrency level."""
        return tuple(c for c in self.cells if c.levels)

    @property
    def memory(self) -> tuple[CellCapacity, ...]:
        """The cells with both a predicted and a measured memory."""
        return tuple(c for c in self.cells if c.predicted_bytes and c.measured_bytes)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def cell_capacity(key: str, state: str, measurements: dict[str, Any]) -> CellCapacity | None:
    """The capacity view's reading of a cell's measurements (None: nothing to draw). Malformed levels are
    skipped rather than trusted: the store may hold runs written by another version."""
    levels = []
    for raw in measurements.get("concurrency") or ():
        if not isinstance(raw, dict) or not isinstance(raw.get("level"), int):
            continue
        levels.append(
            SweepLevel(
                level=raw["level"],
                streams_ok=int(raw.get("streams_ok") or 0),
                aggregate_tps=_number(raw.get("aggregate_tps")) or 0.0,
                per_stream_tps=_number(raw.get("per_stream_tps")) or 0.0,
                ttft_p50_ms=_number(raw.get("ttft_p50_ms")),
                ttft_p95_ms=_number(raw.get("ttft_p95_ms")),
                engine=str(raw.get("engine") or ""),
                parallel=int(raw.get("parallel") or 1),
            )
        )
    predicted = _number(measurements.get("predicted_bytes"))
    # Measured as the exports take it (the view and the tables agree): the worker's peak RSS on a CPU, its peak
    # VRAM on a GPU, as the prediction is of one or the other.
    backend = key.split("@")[1].split("/")[0] if key.count("@") >= 2 else "cpu"
    measured = _number(measurements.get("peak_rss" if backend == "cpu" else "peak_vram"))
    if not levels and not predicted:
        return None
    return CellCapacity(
        key,
        state,
        tuple(sorted(levels, key=lambda lv: lv.level)),
        int(predicted) if predicted else None,
        int(measured) if measured else None,
    )


def packing_of(raw: dict[str, Any], run_id: int | None = None) -> Packing:
    """A stored packing result as plain data."""
    workers = tuple(
        PackedWorker(str(w.get("model", "?")), _number(w.get("alone_tps")), _number(w.get("together_tps")))
        for w in raw.get("workers") or ()
        if isinstance(w, dict)
    )
    alone = {w.model: w.alone_tps for w in workers}  # a step records only the speed together
    steps = tuple(
        (
            int(step["count"]),
            tuple(
                PackedWorker(str(w.get("model", "?")), alone.get(str(w.get("model"))), _number(w.get("together_tps")))
                for w in step.get("workers") or ()
                if isinstance(w, dict)
            ),
        )
        for step in raw.get("steps") or ()
        if isinstance(step, dict) and isinstance(step.get("count"), int)
    )
    gpus = raw.get("gpu_clock_mhz") if isinstance(raw.get("gpu_clock_mhz"), dict) else {}
    return Packing(
        run_id=run_id,
        pool=str(raw.get("pool", "?")),
        models=tuple(str(m) for m in raw.get("models") or ()),
        predicted_count=int(raw.get("predicted_count") or 0),
        started=int(raw.get("started") or len(workers)),
        refused=str(raw.get("refused") or ""),
        workers=workers,
        steps=steps,
        ram_used_peak=int(ram) if (ram := _number(raw.get("ram_used_peak"))) is not None else None,
        swap_used_peak=int(swap) if (swap := _number(raw.get("swap_used_peak"))) is not None else None,
        temps_peak_c=_number(raw.get("temps_peak_c")),
        cpu_freq_mhz=_clock(raw.get("cpu_freq_mhz")),
        gpu_clock_mhz=tuple((str(gpu), *clock) for gpu, freq in sorted(gpus.items()) if (clock := _clock(freq))),
    )


def _clock(freq: Any) -> tuple[float, float] | None:
    """(idle, lowest under load) from `{"idle": MHz, "min_load": MHz}`; None where the node cannot tell."""
    if not isinstance(freq, dict):
        return None
    idle, low = _number(freq.get("idle")), _number(freq.get("min_load"))
    return (idle, low) if idle and low else None
