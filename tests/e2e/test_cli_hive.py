"""`rbee-hive worker list` as people read it: uptime the way the dashboard shows it."""

from __future__ import annotations

import json
import re

from rbee_tui.hive.cli import _worker_line
from rbee_tui.ui import format as screen_format
from rbee_tui.units import duration


def test_one_duration_formatter_for_cli_and_screens() -> None:
    assert [duration(s) for s in (None, 0, 59.9, 61, 3599, 3725, 90000)] == [
        "?",
        "0s",
        "59s",
        "1m01s",
        "59m59s",
        "1h02m",
        "25h00m",
    ]
    assert screen_format.duration is duration  # the workers table imports it from the screens' module


def test_worker_list_shows_uptime_like_the_dashboard(hive) -> None:
    spawned = hive("worker", "spawn", "cpu", "--model", "tiny-test", "--wait", "--json", check=True)
    worker_id = json.loads(spawned.stdout.strip().splitlines()[-1])["id"]
    try:
        table = hive("worker", "list", check=True).stdout.splitlines()
        assert table[0].split() == ["ID", "Model", "Backend", "GPU", "Port", "State", "Uptime", "RSS", "Engine"]
        [row] = [line for line in table[1:] if line.startswith(worker_id)]
        uptime = row[table[0].index("State") + 20 : table[0].index("Uptime") + len("Uptime")].strip()
        assert re.fullmatch(r"\d+s|\d+m\d\ds", uptime), row
        # A worker up for an hour reads as the workers table shows it, not as raw seconds.
        [listed] = json.loads(hive("worker", "list", "--json", check=True).stdout)["workers"]
        assert "  1h02m  " in _worker_line({**listed, "uptime_s": 3725.0})
    finally:
        hive("worker", "stop", worker_id, check=True)
