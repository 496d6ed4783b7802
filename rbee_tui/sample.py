"""A node's metrics sample as the dashboard reads it: parsed once where it arrives, frozen, typed.

A reading the node cannot give is None together with the node's reason, never 0: a gauge then says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _opt_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _opt_float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Memory:
    """RAM: used is total minus available (what the kernel says is taken)."""

    total: int
    available: int
    used: int
    percent: float


@dataclass(frozen=True)
class Swap:
    """Swap space (total 0: no swap); sin/sout: bytes swapped in and out since boot, None where not reported."""

    total: int
    used: int
    sin: int | None = None
    sout: int | None = None

    @property
    def percent(self) -> float | None:
        """Used share, or None when there is no swap."""
        return 100.0 * self.used / self.total if self.total else None


@dataclass(frozen=True)
class GpuReading:
    """One GPU; None where NVML gave nothing."""

    index: int
    name: str
    memory_used: int | None
    memory_total: int | None
    util_percent: float | None
    temp_c: float | None
    power_w: float | None
    clock_sm_mhz: float | None = None  # falls under load when the GPU throttles
    clock_sm_max_mhz: float | None = None

    @property
    def memory_percent(self) -> float | None:
        """VRAM used, in percent, or None when not reported."""
        if not self.memory_total or self.memory_used is None:
            return None
        return 100.0 * self.memory_used / self.memory_total

    @property
    def memory_free(self) -> int | None:
        """VRAM free, or None when not reported."""
        if self.memory_total is None or self.memory_used is None:
            return None
        return self.memory_total - self.memory_used


@dataclass(frozen=True)
class WorkerReading:
    """A registered worker as the node sees it at sampling time."""

    id: str
    model: str
    pid: int | None
    alive: bool
    rss_bytes: int | None
    vram_bytes: int | None


@dataclass(frozen=True)
class Sample:
    """One sample of a node: memory, CPU, load, I/O, temperatures, GPUs and workers."""

    ts: float
    ram: Memory
    swap: Swap
    cpu_percent: float
    cores: int
    load: tuple[float, float, float]
    disk_read_bps: float | None
    disk_write_bps: float | None
    disk_reason: str
    net_rx_bps: float
    net_tx_bps: float
    cpu_temp_c: float | None
    cpu_temp_reason: str
    gpus: tuple[GpuReading, ...]
    gpus_reason: str
    workers: tuple[WorkerReading, ...]
    cpu_freq_mhz: float | None = None  # the mean core clock: falls under load when the CPU throttles
    cpu_freq_reason: str = ""

    @classmethod
    def parse(cls, doc: dict[str, Any]) -> Sample:
        """Read `rbee-hive metrics --json`'s object (see docs/protocol.md); KeyError/TypeError if malformed."""
        ram, swap, cpu = doc["ram"], doc["swap"], doc["cpu"]
        disk, net, temps = doc.get("disk"), doc["net"], doc.get("temps") or {}
        load = [float(x) for x in doc.get("load") or (0.0, 0.0, 0.0)]
        return cls(
            ts=float(doc["ts"]),
            ram=Memory(int(ram["total"]), int(ram["available"]), int(ram["used"]), float(ram["percent"])),
            swap=Swap(int(swap["total"]), int(swap["used"]), _opt_int(swap.get("sin")), _opt_int(swap.get("sout"))),
            cpu_percent=float(cpu["percent"]),
            cores=len(cpu.get("per_core") or []) or 1,
            load=(load[0], load[1], load[2]),
            disk_read_bps=_opt_float(disk["read_bps"]) if disk else None,
            disk_write_bps=_opt_float(disk["write_bps"]) if disk else None,
            disk_reason=str(doc.get("disk_reason") or ""),
            net_rx_bps=float(net["rx_bps"]),
            net_tx_bps=float(net["tx_bps"]),
            cpu_temp_c=_opt_float(temps.get("cpu_c")),
            cpu_temp_reason=str(temps.get("cpu_reason") or ""),
            gpus=tuple(
                GpuReading(
                    index=int(g.get("index", i)),
                    name=str(g.get("name") or f"GPU {i}"),
                    memory_used=_opt_int(g.get("memory_used")),
                    memory_total=_opt_int(g.get("memory_total")),
                    util_percent=_opt_float(g.get("util_percent")),
                    temp_c=_opt_float(g.get("temp_c")),
                    power_w=_opt_float(g.get("power_w")),
                    clock_sm_mhz=_opt_float(g.get("clock_sm_mhz")),
                    clock_sm_max_mhz=_opt_float(g.get("clock_sm_max_mhz")),
                )
                for i, g in enumerate(doc.get("gpus") or [])
            ),
            gpus_reason=str(doc.get("gpus_reason") or ""),
            workers=tuple(
                WorkerReading(
                    id=str(w["id"]),
                    model=str(w.get("model", "")),
                    pid=_opt_int(w.get("pid")),
                    alive=bool(w.get("alive")),
                    rss_bytes=_opt_int(w.get("rss_bytes")),
                    vram_bytes=_opt_int(w.get("vram_bytes")),
                )
                for w in doc.get("workers") or []
            ),
            cpu_freq_mhz=_opt_float(cpu.get("freq_mhz")),
            cpu_freq_reason=str(cpu.get("freq_reason") or ""),
        )

    @property
    def temps(self) -> tuple[float, ...]:
        """Every temperature reported (CPU and GPUs)."""
        found = [self.cpu_temp_c, *(g.temp_c for g in self.gpus)]
        return tuple(t for t in found if t is not None)

    def worker(self, worker_id: str) -> WorkerReading | None:
        """The reading of one worker, if the node lists it."""
        return next((w for w in self.workers if w.id == worker_id), None)
