"""Downloads through `rbee-hive models download` against the hub stand-in, with huggingface_hub doing its part."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from rbee_tui.catalog import CatalogStore
from tests.conftest import hive_cmd, json_lines
from tests.support.hub import HubServer

REPO = "rbee-test/medium-GGUF"
FILE = "medium.gguf"


@pytest.fixture
def served(hub: HubServer, medium_gguf: Path, hive) -> HubServer:
    hub.add(REPO, FILE, data=medium_gguf.read_bytes())
    hive("models", "register", "medium", "--repo", REPO, "--file", FILE, "--name", "Medium", check=True)
    return hub


def catalog_entry(models_dir: Path, model_id: str) -> dict:
    doc = json.loads((models_dir / "catalog.json").read_text())
    return next(m for m in doc["models"] if m["id"] == model_id)


def test_download_reports_progress_and_marks_downloaded(
    served: HubServer, hive, models_dir: Path, medium_gguf: Path
) -> None:
    served.throttle_bps = 40_000_000  # slow enough for several progress events
    proc = hive("models", "download", "medium", "--json", check=True)
    events = json_lines(proc.stdout)
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) >= 2
    assert all(e["bytes_total"] == medium_gguf.stat().st_size for e in progress)
    assert [e["bytes_done"] for e in progress] == sorted(e["bytes_done"] for e in progress)
    assert {"speed_bps", "eta_s", "file", "model"} <= set(progress[0])
    final = events[-1]
    assert final["event"] == "done" and not final["already_downloaded"]
    assert final["bytes_transferred"] == medium_gguf.stat().st_size
    entry = catalog_entry(models_dir, "medium")
    assert entry["downloaded"] is True
    assert entry["size_bytes"] == medium_gguf.stat().st_size
    assert entry["metadata"]["sha256"] == served.files[(REPO, FILE)].sha256
    assert entry["metadata"]["context_length"] == 512  # read from the GGUF header
    assert Path(entry["path"]).read_bytes() == medium_gguf.read_bytes()

    # Downloading again is a no-op: nothing is fetched.
    gets_before = len(served.gets())
    again = json_lines(hive("models", "download", "medium", "--json", check=True).stdout)
    assert again[-1]["already_downloaded"] is True
    assert len(served.gets()) == gets_before


def test_a_cut_transfer_resumes_within_the_run(served: HubServer, hive, medium_gguf: Path) -> None:
    size = medium_gguf.stat().st_size
    served.cut_after = size // 3
    final = json_lines(hive("models", "download", "medium", "--json", check=True).stdout)[-1]
    assert final["event"] == "done"
    ranges = [r.range for r in served.gets()]
    assert ranges[0] is None and ranges[1] == f"bytes={size // 3}-"
    assert served.bytes_sent == size, "nothing may be sent twice"


def test_an_interrupted_run_resumes_where_it_stopped(
    served: HubServer, hive, models_dir: Path, medium_gguf: Path
) -> None:
    size = medium_gguf.stat().st_size
    served.throttle_bps = 2_000_000
    proc = subprocess.Popen(
        hive_cmd("models", "download", "medium", "--json"),
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            event = json.loads(line)
            if event["event"] == "progress" and event["bytes_done"] >= size // 3:
                break
        proc.kill()  # the node dies mid-download: no chance to clean up
    finally:
        proc.wait(10)
    assert catalog_entry(models_dir, "medium")["downloaded"] is False
    partial = models_dir / "medium" / ".partial" / "medium.gguf.part"
    kept = partial.stat().st_size
    assert kept >= size // 4
    first_run_bytes = served.bytes_sent
    served.throttle_bps = None
    final = json_lines(hive("models", "download", "medium", "--json", check=True).stdout)[-1]
    assert final["resumed_from"] == kept
    assert served.gets()[-1].range == f"bytes={kept}-"
    assert served.bytes_sent - first_run_bytes == size - kept, "the second run re-sent bytes it already had"
    assert catalog_entry(models_dir, "medium")["downloaded"] is True
    assert Path(final["path"]).read_bytes() == medium_gguf.read_bytes()


def test_cancel_keeps_the_partial_and_marks_nothing(
    served: HubServer, hive, models_dir: Path, medium_gguf: Path
) -> None:
    served.throttle_bps = 2_000_000
    proc = subprocess.Popen(
        hive_cmd("models", "download", "medium", "--json"),
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(json.loads(line))
        if lines[-1]["event"] == "progress" and lines[-1]["bytes_done"] > 0:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=30)
    lines += json_lines(rest)
    assert proc.returncode == 130
    assert lines[-1]["event"] == "cancelled"
    assert catalog_entry(models_dir, "medium")["downloaded"] is False
    assert not (models_dir / "medium" / "medium.gguf").exists()
    assert (models_dir / "medium" / ".partial" / "medium.gguf.part").exists()


def test_wrong_magic_is_not_marked(hub: HubServer, hive, models_dir: Path) -> None:
    hub.add(REPO, "fake.gguf", data=b"PK\x03\x04" + os.urandom(100_000))
    hive("models", "register", "fake", "--repo", REPO, "--file", "fake.gguf", check=True)
    proc = hive("models", "download", "fake", "--json")
    assert proc.returncode == 1
    assert "not a GGUF file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert catalog_entry(models_dir, "fake")["downloaded"] is False
    assert not (models_dir / "fake" / "fake.gguf").exists()


def test_truncated_file_is_not_marked(hub: HubServer, hive, models_dir: Path, medium_gguf: Path) -> None:
    data = medium_gguf.read_bytes()
    hub.add(REPO, "cut.gguf", data=data[: len(data) // 2])  # a hub that holds a truncated upload
    hive("models", "register", "cut", "--repo", REPO, "--file", "cut.gguf", check=True)
    proc = hive("models", "download", "cut", "--json")
    assert proc.returncode == 1
    assert "truncated or malformed" in proc.stderr
    assert catalog_entry(models_dir, "cut")["downloaded"] is False


def test_offline_gives_one_clear_line(hive, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    hive("models", "catalog", check=True)
    before = (models_dir / "catalog.json").read_bytes()
    proc = hive("models", "download", "tinyllama", "--json")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the model hub" in lines[0]
    assert json_lines(proc.stdout)[-1]["event"] == "error"
    assert (models_dir / "catalog.json").read_bytes() == before


def test_gated_repo_says_to_set_a_token(hub: HubServer, hive) -> None:
    hub.refuse = True
    proc = hive("models", "download", "tinyllama")
    assert proc.returncode == 1
    assert "HF_TOKEN" in proc.stderr


def test_hf_token_is_sent(served: HubServer, hive, monkeypatch: pytest.MonkeyPatch, models_dir: Path) -> None:
    served.token = "hf_test_secret"
    assert hive("models", "download", "medium").returncode == 1
    monkeypatch.setenv("HF_TOKEN", "hf_test_secret")
    hive("models", "download", "medium", check=True)
    assert catalog_entry(models_dir, "medium")["downloaded"] is True


def test_split_model_downloads_as_a_set(hub: HubServer, hive, models_dir: Path, medium_gguf: Path) -> None:
    # Three whole GGUF files stand for the three parts of a split model.
    parts = [medium_gguf.read_bytes()] * 3
    for i, data in enumerate(parts, 1):
        hub.add(REPO, f"big-{i:05d}-of-00003.gguf", data=data)
    hive("models", "register", "big", "--repo", REPO, "--file", "big-00001-of-00003.gguf", check=True)
    final = json_lines(hive("models", "download", "big", "--json", check=True).stdout)[-1]
    assert final["size_bytes"] == sum(len(p) for p in parts)
    entry = catalog_entry(models_dir, "big")
    assert entry["downloaded"] is True
    assert [f["file"] for f in entry["metadata"]["files"]] == [f"big-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    for i in (1, 2, 3):
        assert (models_dir / "big" / f"big-{i:05d}-of-00003.gguf").exists()


def test_a_truncated_later_part_fails_the_whole_set(hub: HubServer, hive, models_dir: Path, medium_gguf: Path) -> None:
    data = medium_gguf.read_bytes()
    for i, part in enumerate([data, data[: len(data) // 2], data], 1):  # the hub holds a cut second part
        hub.add(REPO, f"cut-{i:05d}-of-00003.gguf", data=part)
    hive("models", "register", "cut", "--repo", REPO, "--file", "cut-00001-of-00003.gguf", check=True)
    proc = hive("models", "download", "cut", "--json")
    assert proc.returncode == 1
    assert "cut-00002-of-00003.gguf.part is truncated or malformed" in proc.stderr
    assert catalog_entry(models_dir, "cut")["downloaded"] is False
    assert not any((models_dir / "cut").glob("cut-*.gguf"))  # nothing moved into place
    assert not (models_dir / "cut" / ".partial" / "cut-00002-of-00003.gguf.part").exists()  # the bad part is gone


def test_verify_notices_a_damaged_file(served: HubServer, hive, models_dir: Path) -> None:
    hive("models", "download", "medium", check=True)
    assert hive("models", "verify", "medium").returncode == 0
    path = Path(catalog_entry(models_dir, "medium")["path"])
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        fh.write(b"\xff" * 16)
    proc = hive("models", "verify", "medium", "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["ok"] is False
    assert catalog_entry(models_dir, "medium")["downloaded"] is False


def test_catalog_cli_for_people_and_scripts(hive, models_dir: Path) -> None:
    human = hive("models", "catalog", check=True).stdout
    assert human.startswith("Model Catalog for local\n")
    assert "Total models: 5" in human
    assert "tinyllama" in human and "TinyLlama 1.1B Chat" in human
    doc = json.loads(hive("models", "catalog", "--json", check=True).stdout)
    assert [m["id"] for m in doc["models"]] == ["qwen-0.5b", "tinyllama", "phi3", "mistral", "tiny-test"]
    listed = json.loads(hive("models", "list", "--json", check=True).stdout)
    assert [m["id"] for m in listed["models"]] == ["tiny-test"]
    status = json.loads(hive("status", "--json", check=True).stdout)
    assert status["pool_id"] == "local" and "cpu" in status["backends"]
    assert status["cpu_count"] == os.cpu_count()
    assert status["gpus"] == [] or all("memory_total" in g for g in status["gpus"])


def test_cli_refuses_bad_ids_before_touching_anything(hive, models_dir: Path) -> None:
    for bad in ["../etc", "a b", "x;id", "$(id)"]:
        proc = hive("models", "register", bad, "--repo", "a/b", "--file", "m.gguf", "--json")
        assert proc.returncode == 1, bad
        assert "invalid model id" in proc.stderr
    doc = json.loads(hive("models", "catalog", "--json", check=True).stdout)
    assert len(doc["models"]) == 5


def test_unregister(served: HubServer, hive, models_dir: Path) -> None:
    hive("models", "download", "medium", check=True)
    hive("models", "unregister", "medium", "--delete-files", check=True)
    assert not (models_dir / "medium").exists()
    assert "medium" not in [m.id for m in CatalogStore(models_dir, "local").load().models]
    assert hive("models", "unregister", "tiny-test").returncode == 1
