"""The gateway started from the dashboard with its key, then called by a real OpenAI client."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import openai

from rbee_tui.app import RbeeApp
from rbee_tui.config import GatewayConfig
from tests.e2e.test_worker_api import free_port
from tests.ui.test_dashboard import cells, local_config, shown, until


async def test_G_starts_the_gateway_the_status_line_shows_it_and_G_stops_it(models_dir: Path) -> None:
    port = free_port()
    config = replace(local_config(models_dir), gateway=GatewayConfig(listen=f"127.0.0.1:{port}"))
    app = RbeeApp(config)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: "tiny-test" in cells(app, "#catalog", 0), what="the catalog")
        assert "gateway" not in shown(app, "#status-line")
        await pilot.press("G")
        url = f"http://127.0.0.1:{port}"
        await until(pilot, lambda: f"gateway {url}/v1" in shown(app, "#status-line"), 30, "the gateway's address")
        assert "0.0 req/s" in shown(app, "#status-line")

        oa = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert "tiny-test" in {m.id for m in (await oa.models.list()).data}
        answer = await oa.chat.completions.create(
            model="tiny-test", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
        assert answer.usage is not None and answer.usage.completion_tokens == 4
        # Its worker, started on demand, is in the Workers pane like any other; the rate shows the request.
        await until(pilot, lambda: "0.0 req/s" not in shown(app, "#status-line"), 30, "the request rate")
        assert [w["model"] for w in app.fleet.client("local").view.workers if w["state"] != "exited"] == ["tiny-test"]

        await pilot.press("G")
        await until(pilot, lambda: "gateway" not in shown(app, "#status-line"), 30, "the gateway to stop")
        await until(
            pilot,
            lambda: all(w["state"] == "exited" for w in app.fleet.client("local").view.workers),
            30,
            "the worker it started to stop",
        )
        await pilot.press("q")
    assert app.return_code == 0
