"""Node metrics for `rbee-hive metrics`: one frozen sample per interval, cheap to take, honest about gaps.

A reading the machine cannot give is left out (or null) with the reason beside it, never reported as 0.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

from rbee_tui.hive.records import Registry, WorkerRecord, _alive, worker_process


class Nvml:
    """NVML, opened once and kept: per-GPU memory, utilisation, temperature, power and per-process memory."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.names: list[str] = []
        self.reason: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(handle)
                self.handles.append(handle)
                self.names.append(name.decode() if isinstance(name, bytes) else name)
            if not self.handles:
                self.reason = "NVML reports no GPU"
        except ImportError:
            self.reason = "nvidia-ml-py is not installed"
        except Exception as exc:  # pynvml raises NVMLError_LibraryNotFound and friends
            self.reason = f"no NVIDIA driver ({exc})"

    def _read(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:  # a reading this GPU does not support stays unknown
            return None

    def sample(self) -> tuple[list[dict[str, Any]], dict[int, int]]:
        """Per-GPU readings, and VRAM used per process id."""
        gpus: list[dict[str, Any]] = []
        per_pid: dict[int, int] = {}
        nv = getattr(self, "nvml", None)
        for i, handle in enumerate(self.handles):
            mem = self._read(nv.nvmlDeviceGetMemoryInfo, handle)
            util = self._read(nv.nvmlDeviceGetUtilizationRates, handle)
            temp = self._read(nv.nvmlDeviceGetTemperature, handle, 0)  # NVML_TEMPERATURE_GPU
            power = self._read(nv.nvmlDeviceGetPowerUsage, handle)
            # The SM clock against its maximum: a clock that drops under load is the GPU throttling.
            clock = self._read(nv.nvmlDeviceGetClockInfo, handle, 1)  # NVML_CLOCK_SM
            clock_max = self._read(nv.nvmlDeviceGetMaxClockInfo, handle, 1)
            gpus.append(
                {
                    "index": i,
                    "name": self.names[i],
                    "memory_used": int(mem.used) if mem else None,
                    "memory_total": int(mem.total) if mem else None,
                    "util_percent": float(util.gpu) if util else None,
                    "temp_c": float(temp) if temp is not None else None,
                    "power_w": round(power / 1000.0, 1) if power is not None else None,
                    "clock_sm_mhz": float(clock) if clock is not None else None,
                    "clock_sm_max_mhz": float(clock_max) if clock_max is not None else None,
                }
            )
            for proc in self._read(nv.nvmlDeviceGetComputeRunningProcesses, handle) or []:
                per_pid[proc.pid] = per_pid.get(proc.pid, 0) + int(proc.usedGpuMemory or 0)
        return gpus, per_pid


def _cpu_temp() -> tuple[float | None, str | None]:
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None, "this OS reports no temperatures to psutil"
    try:
        sensors = read()
    except Exception as exc:
        return None, f"temperature sensors unreadable ({exc})"
    for key in ("coretemp", "k10temp", "zenpower", "cpu_thermal", "cpu-thermal", "acpitz"):
        entries = sensors.get(key)
        if entries:
            return max(e.current for e in entries), None
    return None, "no CPU temperature sensor found"


def _cpu_freq() -> tuple[float | None, str | None]:
    """The CPU clock now, in MHz (the mean over cores): it drops below its usual value when the CPU throttles."""
    read = getattr(psutil, "cpu_freq", None)
    if read is None:
        return None, "this OS reports no CPU clock to psutil"
    try:
        freq = read()
    except Exception as exc:
        return None, f"CPU clock unreadable ({exc})"
    if freq is None or not freq.current:
        return None, "no CPU clock reported (no cpufreq on this machine)"
    return round(float(freq.current), 1), None


class Sampler:
    """Takes samples; keeps the previous counters so rates (disk, network) cover exactly one interval."""

    def __init__(self, pool_id: str) -> None:
        self.registry = Registry(pool_id)
        self.nvml = Nvml()
        self.proc = psutil.Process()
        self.last_t = time.monotonic()
        self.last_disk = psutil.disk_io_counters()
        self.last_net = psutil.net_io_counters()
        self._workers: list[WorkerRecord] = []
        self._workers_mtime = -1.0
        self._procs: dict[str, psutil.Process | None] = {}
        psutil.cpu_percent(percpu=True)  # the first call only primes the counters

    def _registry_workers(self) -> list[WorkerRecord]:
        try:
            mtime = self.registry.path.stat().st_mtime
        except FileNotFoundError:
            return []
        if mtime != self._workers_mtime:  # re-read only when it changed
            self._workers_mtime = mtime
            self._workers = self.registry.read()
            self._procs = {}
        return self._workers

    def _worker_rows(self, vram: dict[int, int]) -> list[dict[str, Any]]:
        rows = []
        for record in self._registry_workers():
            proc = self._procs.get(record.id)
            if proc is None or not proc.is_running():
                proc = worker_process(record) if _alive(record) else None
                self._procs[record.id] = proc
            rss = None
            if proc is not None:
                try:
                    rss = proc.memory_info().rss
                except psutil.NoSuchProcess:
                    proc = None
            rows.append(
                {
                    "id": record.id,
                    "model": record.model,
                    "backend": record.backend,
                    "gpu": record.gpu,
                    "port": record.port,
                    "pid": proc.pid if proc else None,
                    "alive": proc is not None,
                    "rss_bytes": rss,
                    "vram_bytes": vram.get(proc.pid) if proc else None,
                }
            )
        return rows

    def sample(self) -> dict[str, Any]:
        """One sample of the whole node."""
        cost0 = time.process_time()
        now = time.monotonic()
        dt = max(now - self.last_t, 1e-6)
        vm = psutil.virtual_memory()
        sw = psutil.swap_memory()
        per_core = psutil.cpu_percent(percpu=True)
        disk = psutil.disk_io_counters()
        net = psutil.net_io_counters()
        out: dict[str, Any] = {
            "ts": time.time(),
            "interval_s": round(dt, 3),
            # used = total - available: what /proc/meminfo's MemTotal - MemAvailable says is taken
            "ram": {
                "total": vm.total,
                "available": vm.available,
                "used": vm.total - vm.available,
                "percent": round(100.0 * (vm.total - vm.available) / vm.total, 2),
            },
            # sin/sout: bytes swapped in and out since boot (their growth over a job is its swap traffic)
            "swap": {"total": sw.total, "used": sw.used, "sin": sw.sin, "sout": sw.sout},
            "cpu": {"percent": round(sum(per_core) / max(len(per_core), 1), 1), "per_core": per_core},
            "load": list(os.getloadavg()),
        }
        if disk is not None and self.last_disk is not None:
            out["disk"] = {
                "read_bps": round((disk.read_bytes - self.last_disk.read_bytes) / dt, 1),
                "write_bps": round((disk.write_bytes - self.last_disk.write_bytes) / dt, 1),
            }
        else:
            out["disk"] = None
            out["disk_reason"] = "no disk counters on this machine"
        out["net"] = {
            "rx_bps": round((net.bytes_recv - self.last_net.bytes_recv) / dt, 1),
            "tx_bps": round((net.bytes_sent - self.last_net.bytes_sent) / dt, 1),
        }
        freq, freq_reason = _cpu_freq()
        out["cpu"]["freq_mhz"] = freq
        if freq_reason:
            out["cpu"]["freq_reason"] = freq_reason
        cpu_temp, temp_reason = _cpu_temp()
        out["temps"] = {"cpu_c": cpu_temp}
        if temp_reason:
            out["temps"]["cpu_reason"] = temp_reason
        gpus, vram = self.nvml.sample()
        if gpus:
            out["gpus"] = gpus
            out["temps"]["gpus_c"] = [g["temp_c"] for g in gpus]
        else:
            out["gpus_reason"] = self.nvml.reason
        out["workers"] = self._worker_rows(vram)
        self.last_t, self.last_disk, self.last_net = now, disk, net
        out["agent_cpu_ms"] = round((time.process_time() - cost0) * 1000.0, 3)
        out["agent_cpu_total_s"] = round(sum(self.proc.cpu_times()[:2]), 3)
        return out
