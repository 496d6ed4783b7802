"""What `rbee-hive status` reports about this node: host, OS, CPUs, RAM, GPUs, backends, agent version."""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

import psutil

from rbee_tui import __version__


def nvidia_gpus() -> tuple[list[dict[str, Any]], str | None]:
    """GPUs seen through NVML, and why there are none when the list is empty."""
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [], f"no NVIDIA driver ({exc})"
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "memory_total": int(mem.total),
                    "memory_used": int(mem.used),
                }
            )
        return gpus, None if gpus else "NVML reports no GPU"
    finally:
        pynvml.nvmlShutdown()


def available_backends(gpus: list[dict[str, Any]], engine: str = "llama-cpp-python") -> list[str]:
    """Backends this node can run: cpu always, cuda with an NVIDIA GPU and a GPU build, metal on Apple silicon.

    For the embedded engine, "a GPU build" is asked of llama-cpp-python; a llama-server binary is taken at its word.
    """
    backends = ["cpu"]
    offload = engine != "llama-cpp-python"
    if not offload:
        try:
            import llama_cpp

            from rbee_tui.llama_build import gpu_offload

            offload = gpu_offload(llama_cpp)
        except Exception:  # a missing or broken engine just means CPU only
            offload = False
    if gpus and offload:
        backends.append("cuda")
    if platform.system() == "Darwin" and platform.machine() == "arm64" and offload:
        backends.append("metal")
    return backends


def node_status(pool_id: str, models_dir: str) -> dict[str, Any]:
    """The `rbee-hive status --json` object."""
    vm = psutil.virtual_memory()
    gpus, gpu_reason = nvidia_gpus()
    out: dict[str, Any] = {
        "pool_id": pool_id,
        "hostname": socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "ram_total": int(vm.total),
        "ram_available": int(vm.available),
        "gpus": gpus,
        "backends": available_backends(gpus),
        "models_dir": models_dir,
        "agent_version": __version__,
    }
    if gpu_reason:
        out["gpus_reason"] = gpu_reason
    return out


def render_status(st: dict[str, Any]) -> str:
    """`rbee-hive status` for people."""
    gib = 1024**3
    lines = [
        f"Pool {st['pool_id']} on {st['hostname']} ({st['os']}, {st['arch']})",
        f"  CPUs: {st['cpu_count']}   RAM: {st['ram_available'] / gib:.1f} GiB free of {st['ram_total'] / gib:.1f} GiB",
    ]
    if st["gpus"]:
        for g in st["gpus"]:
            lines.append(f"  GPU {g['index']}: {g['name']}, {g['memory_total'] / gib:.1f} GiB")
    else:
        lines.append(f"  GPUs: none ({st.get('gpus_reason', 'unknown')})")
    lines.append(f"  Backends: {', '.join(st['backends'])}")
    lines.append(f"  Models: {st['models_dir']}")
    lines.append(f"  rbee-hive {st['agent_version']}")
    return "\n".join(lines)
