"""The Textual app: owns the Fleet (the service layer), composes the screens, renders what the Fleet reports."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Header, Input, Static, TabbedContent, TabPane

from rbee_tui.catalog import human_size
from rbee_tui.config import Config
from rbee_tui.errors import RbeeError
from rbee_tui.fleet import Fleet, FleetEvent
from rbee_tui.themes import THEME_NAMES, THEMES, stylesheets
from rbee_tui.ui.format import duration
from rbee_tui.ui.screens.dialogs import (
    ConfirmDialog,
    HostKeyDialog,
    PoolDialog,
    RegisterDialog,
    SpawnDialog,
)
from rbee_tui.ui.screens.info import ErrorLogScreen, HelpScreen, OverviewScreen, WorkerLogScreen
from rbee_tui.ui.screens.matrix import MatrixScreen
from rbee_tui.ui.widgets.downloads import DownloadsPane
from rbee_tui.ui.widgets.gauges import GaugesPane
from rbee_tui.ui.widgets.line import Line
from rbee_tui.ui.widgets.pools import PoolList
from rbee_tui.ui.widgets.tables import sync_rows

CATALOG_COLUMNS = ("ID", "Name", "Arch", "Size", "Downloaded", "Backends", "On pools")
SAMPLE_FRAME_S = 0.25  # samples that came in are drawn together this often
WORKER_COLUMNS = ("ID", "Model", "Backend", "GPU", "Port", "State", "Uptime", "RSS", "VRAM", "Last tok/s")


class FleetUpdate(Message):
    """The service layer reported a change. Samples of one pool replace each other while the screen is busy."""

    def __init__(self, event: FleetEvent) -> None:
        super().__init__()
        self.event = event

    def can_replace(self, message: Message) -> bool:
        return (
            isinstance(message, FleetUpdate)
            and self.event.kind == "sample" == message.event.kind
            and self.event.pool == message.event.pool
        )


class RbeeApp(App[None]):
    """rbee-tui: pools on the left; the selected pool's catalog, downloads, workers and gauges on the right."""

    TITLE = "rbee-tui"
    CSS_PATH = stylesheets()
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("o", "overview", "Overview"),
        Binding("m", "matrix", "Matrix"),
        Binding("1", "tab('tab-catalog')", "Catalog", show=False),
        Binding("2", "tab('tab-downloads')", "Downloads", show=False),
        Binding("3", "tab('tab-workers')", "Workers", show=False),
        Binding("4", "tab('tab-gauges')", "Gauges", show=False),
        Binding("d", "download", "Download"),
        Binding("v", "verify", "Verify", show=False),
        Binding("n", "register", "Register", show=False),
        Binding("x", "unregister", "Unregister", show=False),
        Binding("c", "cancel_download", "Cancel dl", show=False),
        Binding("s", "spawn", "Spawn"),
        Binding("k", "stop_worker", "Stop"),
        Binding("l", "worker_log", "Log"),
        Binding("p", "prompt", "Prompt", show=False),
        Binding("a", "add_pool", "Add pool", show=False),
        Binding("E", "edit_pool", "Edit pool", show=False),
        Binding("t", "toggle_theme", "Theme", show=False),
        Binding("e", "errors", "Errors", show=False),
        Binding("r", "refresh", "Refresh", show=False),
    ]

    def __init__(self, config: Config, autostart: bool = True, **client_options: Any) -> None:
        super().__init__()
        self.config = config
        self.fleet = Fleet(config, self._from_fleet, **client_options)
        self.autostart = autostart
        self.selected = config.pools[0].name
        self.errors: list[tuple[float, str]] = []
        self.asked_host_key: set[str] = set()
        self._samples_due: set[str] = set()
        self._stale_panes: set[str] = set()  # panes changed while hidden: drawn when their tab is shown

    # -- composition --------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            yield PoolList([p.name for p in self.config.pools])
            with TabbedContent(id="panes", initial="tab-catalog"):
                with TabPane("Catalog", id="tab-catalog"):
                    yield Static("d download  v verify  n register  x unregister", id="catalog-actions")
                    yield DataTable(id="catalog", cursor_type="row", zebra_stripes=True)
                with TabPane("Downloads", id="tab-downloads"):
                    yield DownloadsPane(id="downloads")
                with TabPane("Workers", id="tab-workers"):
                    yield Static("s spawn  k stop  l log  p prompt", id="workers-actions")
                    with Vertical():
                        yield DataTable(id="workers", cursor_type="row", zebra_stripes=True)
                        yield Input(placeholder="quick prompt to the selected worker (Enter sends)", id="prompt")
                        yield Static("", id="reply")
                with TabPane("Gauges", id="tab-gauges"):
                    yield GaugesPane(id="gauges")
        yield Line("", id="status-line")
        yield Footer()

    def on_mount(self) -> None:
        for theme in THEMES:
            self.register_theme(theme)
        self.theme = self.config.theme if self.config.theme in THEME_NAMES else THEME_NAMES[0]
        self.query_one("#catalog", DataTable).add_columns(*CATALOG_COLUMNS)
        self.query_one("#workers", DataTable).add_columns(*WORKER_COLUMNS)
        self.query_one(PoolList).index = 0
        self.set_interval(SAMPLE_FRAME_S, self._draw_samples)
        if self.autostart:
            self.fleet.start()

    def watch_theme(self, theme: str) -> None:
        """Scope the theme's own stylesheet: each themes/<name>.tcss styles `.-theme-<name>`."""
        for name in THEME_NAMES:
            self.set_class(name == theme, f"-theme-{name}")

    async def on_unmount(self) -> None:
        await self.fleet.close()

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        """Every action in the command palette."""
        yield from super().get_system_commands(screen)
        for b in self.BINDINGS:
            if isinstance(b, Binding) and b.action not in ("quit",):
                yield SystemCommand(b.description, f"key {b.key}", lambda a=b.action: self.run_action(a))

    # -- events from the service layer ---------------------------------------------------------------------

    def _from_fleet(self, event: FleetEvent) -> None:
        self.post_message(FleetUpdate(event))

    def on_fleet_update(self, message: FleetUpdate) -> None:
        ev = message.event
        if not self.screen_stack:  # quitting: the pools may still be talking while the screens are gone
            return
        if ev.kind == "error":
            self.report(ev.data)
            return
        if ev.kind == "download":
            self.query_one(DownloadsPane).show(ev.data)
            return
        if ev.kind == "matrix":
            if isinstance(self.screen, MatrixScreen):
                self.screen.update_cell(ev.data)
            return
        if ev.kind == "state" and ev.data[0] == "lost" and "is unknown (SHA256:" in ev.data[1]:
            self.ask_host_key(ev.pool)
        if ev.kind == "sample":
            # Samples are drawn together a few times a second: with many pools, a frame per sample kept the
            # loop busy drawing when a key came in.
            self._samples_due.add(ev.pool)
            return
        self._apply(ev.pool, ev.kind)

    def _draw_samples(self) -> None:
        due, self._samples_due = self._samples_due, set()
        if not due or not self.screen_stack or not self.screen_stack[0].query(PoolList):
            return  # nothing new, or the screens are being taken down on the way out
        with self.batch_update():
            for pool in due:
                self._apply(pool, "sample")

    def _apply(self, pool: str, kind: str) -> None:
        """Redraw what a change of `kind` in `pool` touches."""
        if isinstance(self.screen, OverviewScreen):
            self.render_card(pool)
        if self.screen is not self.screen_stack[0] and not isinstance(self.screen, ModalScreen):
            return  # the main screen is covered: it is redrawn whole when it shows again
        self.render_pool_row(pool)
        if pool != self.selected:
            return
        if kind == "catalog":
            self.render_catalog()
        elif kind == "workers":
            self.render_workers()
        elif kind in ("sample", "state"):
            self.render_gauges()
            self.render_status()
            if kind == "sample":
                self.render_workers()

    def report(self, text: str) -> None:
        """An error for the user: one line as a notification, kept in the error log."""
        self.errors.append((time.time(), text))
        self.notify(text.splitlines()[0], severity="error", timeout=8)

    # -- rendering -----------------------------------------------------------------------------------------

    def render_pool_row(self, pool: str) -> None:
        try:
            pools = self.screen_stack[0].query_one(PoolList)
        except (IndexError, NoMatches):
            return  # the main screen is not composed yet, or already taken down: its next event draws it
        item = pools.item(pool)
        if item is not None:  # drawn even before it is mounted: it keeps the text for its first paint
            view = self.fleet.client(pool).view
            item.show(view.state, view.reason, view.last_sample)

    def render_card(self, pool: str) -> None:
        screen = self.screen
        if isinstance(screen, OverviewScreen) and (card := screen.card(pool)) is not None:
            view = self.fleet.client(pool).view
            card.show(view.state, view.reason, view.last_sample, view.workers)

    def render_status(self) -> None:
        view = self.fleet.client(self.selected).view
        st = view.status
        where = f"{st.get('hostname', '?')} ({st.get('os', '?')})" if st else ""
        text = f"{self.selected}: {view.state}" + (f" - {view.reason}" if view.reason else "") + f"  {where}"
        self.query_one("#status-line", Line).update(text)

    def _showing(self, pane: str) -> bool:
        """Whether `pane` is on screen; if not, it is drawn when its tab is shown. Drawing a hidden widget makes
        Textual lay out the whole screen again on the next frame, and a key pressed meanwhile waits for it."""
        try:
            shown = self.screen_stack[0].query_one(TabbedContent).active == f"tab-{pane}"
        except (IndexError, NoMatches):
            shown = False
        if not shown:
            self._stale_panes.add(pane)
        return shown

    @on(TabbedContent.TabActivated, "#panes")
    def pane_shown(self, event: TabbedContent.TabActivated) -> None:
        pane = (event.pane.id or "").removeprefix("tab-")
        if pane in self._stale_panes:
            self._stale_panes.discard(pane)
            {"catalog": self.render_catalog, "workers": self.render_workers, "gauges": self.render_gauges}[pane]()

    def render_catalog(self) -> None:
        if not self._showing("catalog"):
            return
        doc = self.fleet.catalogs.get(self.selected, {"models": []})
        rows = [
            (
                m["id"],
                (
                    m["id"],
                    m["name"],
                    m["architecture"],
                    human_size(m["size_bytes"]),
                    "✅" if m["downloaded"] else "❌",
                    ",".join(m["backends"]),
                    ",".join(self.fleet.pools_having(m["id"])) or "-",
                ),
            )
            for m in doc["models"]
        ]
        sync_rows(self.query_one("#catalog", DataTable), rows)

    def render_workers(self) -> None:
        if not self._showing("workers"):
            return
        view = self.fleet.client(self.selected).view
        live_rows = {r["id"]: r for r in (view.last_sample or {}).get("workers", [])}
        rows = []
        for w in [*view.workers, *self.fleet.pending.get(self.selected, [])]:
            live = live_rows.get(w["id"], {})
            rss = live.get("rss_bytes", w.get("rss_bytes"))
            vram = live.get("vram_bytes")
            tps = self.fleet.last_tps.get((self.selected, w["id"]))
            state = w["state"] if w["state"] != "exited" else f"exited ({w.get('reason', '')[:40]})"
            cells = (
                w["id"],
                w["model"],
                w["backend"],
                str(w["gpu"]),
                str(w["port"]),
                state,
                duration(time.time() - w["started_at"]),
                human_size(rss or 0),
                human_size(vram) if vram else "-",
                f"{tps:.1f}" if tps else "-",
            )
            rows.append((w["id"], cells))
        sync_rows(self.query_one("#workers", DataTable), rows)

    def render_gauges(self) -> None:
        if not self._showing("gauges"):
            return
        view = self.fleet.client(self.selected).view
        cpus = int(view.status.get("cpu_count") or 1)
        self.query_one(GaugesPane).render_sample(view.last_sample, list(view.history), cpus)

    def render_all(self) -> None:
        """Redraw everything of the selected pool."""
        self.render_catalog()
        self.render_workers()
        self.render_gauges()
        self.render_status()

    @on(PoolList.Selected)
    def pool_selected(self, message: PoolList.Selected) -> None:
        # The status line names the pool; a header subtitle would cost a layout pass of the screen per switch.
        self.selected = message.pool
        self.render_all()

    # -- selection helpers ---------------------------------------------------------------------------------

    def _row_key(self, table_id: str) -> str | None:
        table = self.query_one(table_id, DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def _model(self) -> dict[str, Any] | None:
        key = self._row_key("#catalog")
        doc = self.fleet.catalogs.get(self.selected, {"models": []})
        return next((m for m in doc["models"] if m["id"] == key), None)

    # -- actions -------------------------------------------------------------------------------------------

    def action_tab(self, tab: str) -> None:
        """Show a pane."""
        self.query_one(TabbedContent).active = tab

    def show(self, screen: Screen[Any]) -> None:
        """Cover the main screen; redraw it whole when it shows again."""
        self.push_screen(screen, lambda _: self.call_after_refresh(self.redraw_main))

    def redraw_main(self) -> None:
        """The main screen, as the service layer knows things now."""
        for pool in self.fleet.clients:
            self.render_pool_row(pool)
        self.render_all()

    def action_matrix(self) -> None:
        """The job board: every model on every pool and backend."""
        self.show(MatrixScreen(self.fleet.matrix))

    def action_help(self) -> None:
        """Keys and what they do."""
        self.show(HelpScreen())

    def action_errors(self) -> None:
        """Every error so far, with details."""
        self.show(ErrorLogScreen(self.errors))

    def action_overview(self) -> None:
        """All pools side by side."""
        self.show(OverviewScreen([p.name for p in self.fleet.config.pools]))
        self.call_after_refresh(lambda: [self.render_card(p) for p in self.fleet.clients])

    def action_toggle_theme(self) -> None:
        """Switch to the next theme and remember it."""
        names = list(THEME_NAMES)
        self.theme = names[(names.index(self.theme) + 1) % len(names)] if self.theme in names else names[0]
        self.save_theme(self.theme)

    @work(thread=True, exit_on_error=False, name="config:theme")
    def save_theme(self, theme: str) -> None:
        try:
            self.fleet.set_theme(theme)
        except (RbeeError, OSError) as exc:
            self.call_from_thread(self.report, f"could not save the theme: {exc}")

    def action_refresh(self) -> None:
        """Fetch the selected pool's catalog and workers again."""
        self.run_task(self.fleet.refresh_catalog(self.selected))
        self.run_task(self.fleet.client(self.selected).workers())

    def action_download(self) -> None:
        """Download the selected model on the selected pool."""
        model = self._model()
        if model is None:
            return
        try:
            self.fleet.download(self.selected, model["id"])
        except RbeeError as exc:
            self.report(str(exc))
            return
        self.notify(f"downloading {model['id']} on {self.selected}")

    def action_cancel_download(self) -> None:
        """Cancel the highlighted download."""
        key = self.query_one(DownloadsPane).selected_key()
        if key:
            self.fleet.cancel_download(key)

    def action_verify(self) -> None:
        """Re-check the selected model's files."""
        if (model := self._model()) is not None:
            self.run_task(self.fleet.verify(self.selected, model["id"]), f"{model['id']} verified")

    def action_register(self) -> None:
        """Register a model (a form)."""
        pool = self.selected

        def done(values: dict[str, str] | None) -> None:
            if values:
                self.run_task(
                    self.fleet.register(
                        pool,
                        values["id"],
                        values["repo"],
                        values["file"],
                        values["name"],
                        values["architecture"],
                        values["backends"],
                    ),
                    f"registered {values['id']} on {pool}",
                )

        self.push_screen(RegisterDialog(pool), done)

    def action_unregister(self) -> None:
        """Unregister the selected model (asks first)."""
        if (model := self._model()) is None:
            return
        pool = self.selected

        def done(yes: bool | None) -> None:
            if yes:
                self.run_task(self.fleet.unregister(pool, model["id"]), f"unregistered {model['id']}")

        self.push_screen(ConfirmDialog(f"Unregister {model['id']} from {pool}? Its files stay.", "Unregister"), done)

    def action_spawn(self) -> None:
        """Spawn a worker (a dialog that explains what cannot run)."""
        pool = self.selected
        view = self.fleet.client(pool).view
        models = self.fleet.catalogs.get(pool, {"models": []})["models"]
        backends = view.status.get("backends", ["cpu"])
        gpus = len(view.status.get("gpus", []))

        def done(choice: dict[str, Any] | None) -> None:
            if choice:
                self.query_one(TabbedContent).active = "tab-workers"
                self.run_task(
                    self.fleet.spawn(pool, choice["backend"], choice["model"], choice["gpu"]),
                    f"{choice['model']} is ready on {pool}",
                )

        self.push_screen(SpawnDialog(pool, models, backends, gpus), done)

    def action_stop_worker(self) -> None:
        """Stop the selected worker."""
        if (wid := self._row_key("#workers")) is not None:
            self.run_task(self.fleet.stop(self.selected, wid), f"{wid} stopped")

    def action_worker_log(self) -> None:
        """Follow the selected worker's log."""
        if (wid := self._row_key("#workers")) is not None:
            self.show(WorkerLogScreen(self.fleet, self.selected, wid))

    def action_prompt(self) -> None:
        """Type a prompt for the selected worker."""
        self.query_one(TabbedContent).active = "tab-workers"
        self.query_one("#prompt", Input).focus()

    @on(Input.Submitted, "#prompt")
    def prompt_submitted(self, event: Input.Submitted) -> None:
        wid = self._row_key("#workers")
        if not event.value.strip() or wid is None:
            self.report("pick a ready worker first (s spawns one)")
            return
        self.stream_reply(self.selected, wid, event.value)

    @work(exclusive=True, exit_on_error=False, name="prompt")
    async def stream_reply(self, pool: str, wid: str, text: str) -> None:
        reply = self.query_one("#reply", Static)
        pieces: list[str] = []
        reply.update("…")
        try:
            async for ev in self.fleet.prompt(pool, wid, text):
                if ev["event"] == "token":
                    pieces.append(ev["t"])
                    reply.update("".join(pieces))
                else:
                    reply.update(
                        "".join(pieces) + f"\n[{ev['tokens_generated']} tokens, "
                        f"{ev['tokens_per_sec']:.1f} tok/s, first token {ev['ttft_ms']:.0f} ms]"
                    )
        except RbeeError as exc:
            self.report(str(exc))
        self.render_workers()

    def action_add_pool(self) -> None:
        """Add a pool (a form that writes the config)."""
        self.push_screen(PoolDialog(), self._pool_saved)

    def action_edit_pool(self) -> None:
        """Edit the selected pool's entry in the config."""
        self.push_screen(PoolDialog(self.fleet.client(self.selected).pool), self._pool_saved)

    def _pool_saved(self, pool: Any) -> None:
        if pool is None:
            return
        try:
            self.fleet.save_pool(pool)
        except (RbeeError, OSError) as exc:
            self.report(f"could not save the config: {exc}")
            return
        pools = self.query_one(PoolList)
        if pools.item(pool.name) is None:
            pools.add(pool.name)
        self.notify(f"pool {pool.name} saved to {self.fleet.config.path}")

    def ask_host_key(self, pool: str) -> None:
        """Offer to accept an unknown host key, once per pool."""
        if pool in self.asked_host_key:
            return
        self.asked_host_key.add(pool)
        self.host_key_dialog(pool)

    @work(exit_on_error=False, name="hostkey")
    async def host_key_dialog(self, pool: str) -> None:
        cfg = self.fleet.client(pool).pool
        try:
            fingerprint = await self.fleet.host_key_fingerprint(pool)
        except Exception as exc:  # the server may be gone again: say so, ask later
            self.asked_host_key.discard(pool)
            self.report(f"{pool}: cannot read its host key: {exc}")
            return
        if await self.push_screen_wait(HostKeyDialog(pool, f"{cfg.host}:{cfg.port}", fingerprint)):
            try:
                await self.fleet.trust(pool)
                self.notify(f"{pool}: host key accepted; reconnecting")
            except RbeeError as exc:
                self.report(str(exc))

    # -- running service calls -----------------------------------------------------------------------------

    def run_task(self, coro: Any, success: str = "") -> None:
        """Run a service call without freezing the screen; its failure becomes a notification."""
        self._run(coro, success)

    @work(exit_on_error=False, group="service")
    async def _run(self, coro: Any, success: str) -> None:
        try:
            await coro
        except RbeeError as exc:
            self.report(str(exc))
            return
        if success:
            self.notify(success)
