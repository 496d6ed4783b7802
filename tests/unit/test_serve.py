"""`rbee-hive serve`: the long-lived agent answers the same as a fresh `rbee-hive`, concurrently, by id."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rbee_tui import PROTOCOL
from tests.conftest import hive_cmd


class Served:
    """A `rbee-hive serve` child with a reader thread, so a test can wait for answers by id."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            hive_cmd("serve"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ.copy()
        )
        assert self.proc.stdout is not None
        self.hello = json.loads(self.proc.stdout.readline())
        self.answers: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.answers.append(json.loads(line))
                self.cond.notify_all()

    def send(self, obj: dict[str, Any] | str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
        self.proc.stdin.flush()

    def answer(self, rid: Any, timeout: float = 30) -> dict[str, Any]:
        with self.cond:
            found: Callable[[], Any] = lambda: next((a for a in self.answers if a["id"] == rid), None)  # noqa: E731
            assert self.cond.wait_for(found, timeout), f"no answer to {rid} after {timeout}s"
            return found()


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
    s.proc.wait(10)


def test_answers_like_a_fresh_process(served: Served, hive, models_dir) -> None:
    assert served.hello["serve"] == 1 and served.hello["protocol"] == PROTOCOL
    args = ["--pool-id", "p1", "--models-dir", str(models_dir), "models", "catalog", "--json"]
    served.send({"id": 1, "argv": args})
    got = served.answer(1)
    fresh = hive(*args, check=True)
    assert got["rc"] == 0 and json.loads(got["out"]) == json.loads(fresh.stdout)
    # A failing command answers its exit status and its one-line error, as the process would.
    bad = ["--pool-id", "p1", "--models-dir", str(models_dir), "worker", "stop", "worker-none", "--json"]
    served.send({"id": 2, "argv": bad})
    got, fresh = served.answer(2), hive(*bad)
    assert got["rc"] == fresh.returncode != 0
    assert got["err"] == fresh.stderr and json.loads(got["out"]) == json.loads(fresh.stdout)


def test_calls_run_at_once_and_a_signal_ends_one(served: Served, models_dir) -> None:
    common = ["--pool-id", "p1", "--models-dir", str(models_dir)]
    served.send({"id": "slow", "argv": [*common, "metrics", "--interval", "0.3", "--count", "3", "--json"]})
    served.send({"id": "quick", "argv": ["version", "--json"]})
    assert json.loads(served.answer("quick")["out"])["protocol"] == PROTOCOL
    assert not any(a["id"] == "slow" for a in served.answers), "answered before the slow call, not after it"
    slow = served.answer("slow")
    samples = [json.loads(line) for line in slow["out"].splitlines() if line.strip()]
    assert slow["rc"] == 0 and len(samples) == 3 and all("ram" in s for s in samples)
    # A call that would run forever is ended by a signal, and still answered.
    served.send({"id": "endless", "argv": [*common, "metrics", "--interval", "0.2", "--json"]})
    served.send({"id": "endless", "signal": "TERM"})
    assert served.answer("endless")["rc"] in (0, 130, 143)


def test_bad_requests_are_answered_and_the_agent_lives_on(served: Served) -> None:
    served.send("not json")
    served.send({"id": 5, "argv": "version --json"})
    served.send({"id": 6, "argv": ["no-such-command"]})
    assert served.answer(None)["rc"] == 2 and "bad request" in served.answer(None)["err"]
    assert served.answer(5)["rc"] == 2 and "argv must be a list" in served.answer(5)["err"]
    assert served.answer(6)["rc"] == 2 and "invalid choice" in served.answer(6)["err"]
    served.send({"id": 7, "argv": ["version", "--json"]})
    assert served.answer(7)["rc"] == 0


def test_end_of_input_ends_it(served: Served) -> None:
    served.send({"id": 1, "argv": ["version", "--json"]})
    served.answer(1)
    assert served.proc.stdin is not None
    served.proc.stdin.close()
    assert served.proc.wait(10) == 0
