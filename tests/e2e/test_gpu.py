"""The CUDA path for real: a worker offloads to the GPU and NVML sees its memory. Skips without a GPU build."""

from __future__ import annotations

import json

import pytest

from rbee_tui.hive.status import available_backends, nvidia_gpus
from tests.conftest import wait_for

GPUS, WHY = nvidia_gpus()
pytestmark = pytest.mark.skipif(
    not GPUS or "cuda" not in available_backends(GPUS),
    reason=f"needs an NVIDIA GPU and a CUDA build of llama-cpp-python ({WHY or 'llama-cpp-python has no GPU offload'})",
)


def vram_of(pid: int) -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        return sum(p.usedGpuMemory or 0 for p in procs if p.pid == pid)
    finally:
        pynvml.nvmlShutdown()


def test_status_reports_the_gpu(hive) -> None:
    st = json.loads(hive("status", "--json", check=True).stdout)
    assert st["gpus"] and st["gpus"][0]["memory_total"] > 0
    assert "cuda" in st["backends"]


def test_cuda_worker_offloads_and_generates(hive) -> None:
    out = hive("worker", "spawn", "cuda", "--model", "tiny-test", "--gpu", "0", "--wait", "--json")
    assert out.returncode == 0, out.stderr
    w = json.loads(out.stdout.strip().splitlines()[-1])
    assert w["backend"] == "cuda"
    used = wait_for(lambda: vram_of(w["worker_pid"]), timeout=30, what="the worker's VRAM in NVML")
    assert used > 0
    from tests.e2e.test_worker_api import http

    status, body = http("POST", f"{w['url']}/v1/completions", {"prompt": "Hello", "max_tokens": 8, "seed": 1})
    assert status == 200 and body["usage"]["completion_tokens"] == 8
    hive("worker", "stop", w["id"], check=True)


def test_cpu_worker_leaves_the_gpu_alone(hive) -> None:
    w = json.loads(hive("worker", "spawn", "cpu", "--model", "tiny-test", "--wait", "--json", check=True).stdout)
    assert vram_of(w["worker_pid"]) == 0
    hive("worker", "stop", w["id"], check=True)


def test_a_gpu_that_does_not_exist_is_refused(hive) -> None:
    proc = hive("worker", "spawn", "cuda", "--model", "tiny-test", "--gpu", str(len(GPUS) + 3))
    assert proc.returncode == 1 and "does not exist on this pool" in proc.stderr


def test_metrics_report_the_gpu_and_the_workers_vram(hive) -> None:
    w = json.loads(hive("worker", "spawn", "cuda", "--model", "tiny-test", "--wait", "--json", check=True).stdout)
    try:
        lines = hive("metrics", "--interval", "0.5", "--count", "3", "--json", check=True).stdout.splitlines()
        sample = json.loads(lines[-1])
        gpu = sample["gpus"][0]
        assert gpu["memory_total"] > 0 and gpu["memory_used"] > 0
        assert gpu["util_percent"] is not None and gpu["temp_c"] is not None and gpu["power_w"] is not None
        assert sample["temps"]["gpus_c"] == [gpu["temp_c"]]
        row = next(r for r in sample["workers"] if r["id"] == w["id"])
        assert row["vram_bytes"] and row["vram_bytes"] > 0
    finally:
        hive("worker", "stop", w["id"], check=True)
