"""The Textual app: owns the Fleet (the service layer), composes the screens and routes what the Fleet reports."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Input
from textual.worker import Worker, WorkerState

from rbee_tui.config import Config, PoolConfig
from rbee_tui.errors import HostKeyUnknown, RbeeError
from rbee_tui.fleet import (
    ClusterChanged,
    ErrorReported,
    Fleet,
    FleetEvent,
    MatrixChanged,
    NoticeReported,
    PoolStateChanged,
    SampleArrived,
    WorkersChanged,
)
from rbee_tui.themes import THEME_NAMES, THEMES, stylesheets
from rbee_tui.ui.screens.capacity import CapacityScreen
from rbee_tui.ui.screens.dashboard import DashboardScreen
from rbee_tui.ui.screens.dialogs import ClusterDialog, ConfirmDialog, HostKeyDialog
from rbee_tui.ui.screens.info import ErrorLogScreen, HelpScreen, OverviewScreen, WorkerLogScreen
from rbee_tui.ui.screens.matrix import MatrixScreen
from rbee_tui.ui.widgets.pools import PoolCard
from rbee_tui.ui.widgets.workers import WorkersPane

SAMPLE_FRAME_S = 0.25  # samples that came in are drawn together this often


class FleetUpdate(Message):
    """The service layer reported `event`. Samples of one pool replace each other while the screen is busy."""

    def __init__(self, event: FleetEvent) -> None:
        super().__init__()
        self.event = event

    def can_replace(self, message: Message) -> bool:
        return (
            isinstance(message, FleetUpdate) and isinstance(self.event, SampleArrived) and self.event == message.event
        )


class RbeeApp(App[None]):
    """rbee-tui: pools on the left; the selected pool's catalog, downloads, workers and gauges on the right."""

    TITLE = "rbee-tui"
    CSS_PATH = stylesheets()
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("t", "toggle_theme", "Theme", show=False),
    ]
    HELP_TITLE = "Everywhere"

    def __init__(self, config: Config, autostart: bool = True, **client_options: Any) -> None:
        super().__init__()
        self.config = config
        self.fleet = Fleet(config, self._from_fleet, **client_options)
        self.autostart = autostart
        self.errors: list[tuple[float, str]] = []
        self.asked_host_key: set[str] = set()
        self._samples_due: set[str] = set()
        self._theme_ready = False

    def get_default_screen(self) -> Screen[Any]:
        return DashboardScreen(self.fleet)

    @property
    def dashboard(self) -> DashboardScreen:
        """The main screen (always at the bottom of the stack)."""
        screen = self.screen_stack[0]
        assert isinstance(screen, DashboardScreen)
        return screen

    @property
    def selected(self) -> str:
        """The pool whose panes show."""
        return self.dashboard.selected

    def on_mount(self) -> None:
        for theme in THEMES:
            self.register_theme(theme)
        self.theme = self.config.theme if self.config.theme in THEME_NAMES else THEME_NAMES[0]
        self._theme_ready = True
        for warning in getattr(self.config, "warnings", ()):
            self.notify(warning, severity="warning", timeout=10)
        self.set_interval(SAMPLE_FRAME_S, self._draw_samples)
        if self.autostart:
            self.fleet.start()

    def watch_theme(self, theme: str) -> None:
        """Scope the theme's own stylesheet (each themes/<name>.tcss styles `.-theme-<name>`); a theme picked
        anywhere (the `t` key, the command palette) is remembered."""
        for name in THEME_NAMES:
            self.set_class(name == theme, f"-theme-{name}")
        if self._theme_ready and theme in THEME_NAMES and theme != self.fleet.config.theme:
            self.save_theme(theme)

    async def on_unmount(self) -> None:
        await self.fleet.close()

    # -- help and the command palette ----------------------------------------------------------------------

    def help_sections(self, screen: Screen[Any]) -> list[tuple[str, list[Binding]]]:
        """The keys that work on `screen`, by where they act, then the ones that work everywhere."""
        sections = getattr(screen, "help_sections", None)
        own = (
            sections()
            if sections
            else [(getattr(screen, "HELP_TITLE", screen.title or "This screen"), list(screen.BINDINGS))]
        )
        return [*own, (self.HELP_TITLE, list(self.BINDINGS))]  # type: ignore[list-item]

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        """The actions of the screen in view (and ours, not Textual's, theme picker)."""
        for command in super().get_system_commands(screen):
            if command.title != "Theme":  # it offers every built-in theme and forgets the choice
                yield command
        for name in THEME_NAMES:
            yield SystemCommand(
                f"Theme: {name}", "switch to this theme (remembered)", lambda n=name: self._set_theme(n)
            )
        for title, bindings in self.help_sections(screen)[:-1]:
            for b in bindings:
                if isinstance(b, Binding) and b.action not in ("quit", "dismiss"):
                    yield SystemCommand(
                        f"{title}: {b.description}",
                        f"key {b.key}",
                        lambda t=title, a=b.action: self.call_later(self._palette_action, screen, t, a),
                    )

    async def _palette_action(self, screen: Screen[Any], section: str, action: str) -> None:
        """Run a screen's or a pane's action from the palette, as its key would (a pane gets the focus first)."""
        if isinstance(screen, DashboardScreen) and section != screen.HELP_TITLE:
            pane = {"Catalog (1)": "catalog", "Downloads (2)": "downloads", "Workers (3)": "workers"}.get(
                section, "clusters"
            )
            screen.focus_pane(pane)
            await self.run_action(action, screen.query_one(f"#{pane}-pane" if pane != "downloads" else "#downloads"))
            return
        await self.run_action(action, screen)

    def _set_theme(self, name: str) -> None:
        self.theme = name

    # -- events from the service layer ---------------------------------------------------------------------

    def _from_fleet(self, event: FleetEvent) -> None:
        self.post_message(FleetUpdate(event))

    def on_fleet_update(self, message: FleetUpdate) -> None:
        event = message.event
        if not self.screen_stack or not isinstance(self.screen_stack[0], DashboardScreen):
            return  # quitting: the pools may still be talking while the screens are gone
        match event:
            case ErrorReported(text=text):
                self.report(text)
                return
            case NoticeReported(text=text):
                self.notify(text, severity="warning", timeout=12)
                return
            case ClusterChanged():
                self.dashboard.apply(event)
                return
            case MatrixChanged(key=key):
                if isinstance(self.screen, MatrixScreen):
                    self.screen.update_cell(key)
                elif isinstance(self.screen, CapacityScreen):
                    self.screen.matrix_changed(key)
                return
            case PoolStateChanged(pool=pool, error=HostKeyUnknown() as error):
                self.ask_host_key(pool, error)
            case SampleArrived(pool=pool):
                # Samples are drawn together a few times a second: with many pools, a frame per sample kept
                # the loop busy drawing when a key came in.
                self._samples_due.add(pool)
                return
        self._route(event)

    def _route(self, event: FleetEvent) -> None:
        if isinstance(self.screen, OverviewScreen) and isinstance(
            event, SampleArrived | PoolStateChanged | WorkersChanged
        ):
            self.render_card(event.pool)
        self.dashboard.apply(event)

    def _draw_samples(self) -> None:
        due, self._samples_due = self._samples_due, set()
        if not due or not self.screen_stack or not isinstance(self.screen_stack[0], DashboardScreen):
            return  # nothing new, or the screens are being taken down on the way out
        with self.batch_update():
            for pool in due:
                self._route(SampleArrived(pool))

    def render_card(self, pool: str) -> None:
        """A pool's card on the overview."""
        screen = self.screen
        if isinstance(screen, OverviewScreen) and (card := screen.card(pool)) is not None:
            view = self.fleet.client(pool).view
            card.show(view.state, view.reason, view.last_sample, view.workers)

    def report(self, text: str) -> None:
        """An error for the user: one line as a notification, kept in the error log."""
        self.errors.append((time.time(), text))
        self.notify(text.splitlines()[0], severity="error", timeout=8)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """Every background failure reaches the error log (a failure that is data is handled where it runs)."""
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.report(f"{event.worker.name or 'background work'} failed: {event.worker.error!r}")

    # -- screens -------------------------------------------------------------------------------------------

    def open_matrix(self) -> None:
        """The job board (one at a time)."""
        if not isinstance(self.screen, MatrixScreen):
            self.push_screen(MatrixScreen(self.fleet.matrix))

    def open_capacity(self) -> None:
        """The capacity view (one at a time): concurrency curves, memory per model, packing."""
        if not isinstance(self.screen, CapacityScreen):
            self.push_screen(CapacityScreen(self.fleet.matrix))

    def open_overview(self) -> None:
        """Every pool as a card."""
        self.push_screen(OverviewScreen([p.name for p in self.fleet.config.pools]))
        self.call_after_refresh(lambda: [self.render_card(p) for p in self.fleet.clients])

    def on_pool_card_opened(self, message: PoolCard.Opened) -> None:
        if isinstance(self.screen, OverviewScreen):
            self.pop_screen()
        self.dashboard.show_pool(message.pool)

    def open_errors(self) -> None:
        """The error log."""
        self.push_screen(ErrorLogScreen(self.errors))

    def open_worker_log(self, pool: str, worker_id: str) -> None:
        """Follow a worker's log."""
        self.push_screen(WorkerLogScreen(self.fleet, pool, worker_id))

    def action_help(self) -> None:
        """Keys that work here, and what they do."""
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.help_sections(self.screen), getattr(self.screen, "HELP_INTRO", "")))

    def action_toggle_theme(self) -> None:
        """Switch to the next theme and remember it."""
        names = list(THEME_NAMES)
        self.theme = names[(names.index(self.theme) + 1) % len(names)] if self.theme in names else names[0]

    async def action_quit(self) -> None:
        """Quit; asks first when a download, a spawn or the matrix would be cut short."""
        busy = self.fleet.busy()
        if not busy:
            self.exit()
            return

        self.confirm(
            "Quit now? This stops " + "; ".join(busy) + " (workers it started are stopped).", "Quit", self.exit
        )

    def confirm(self, question: str, ok: str, then: Callable[[], object]) -> None:
        """Ask before something that cannot be undone; the safe answer has the focus, so Enter keeps things."""

        def done(yes: bool | None) -> None:
            if yes:
                then()

        self.push_screen(ConfirmDialog(question, ok, safe_first=True), done)

    @work(thread=True, exit_on_error=False, name="config:theme")
    def save_theme(self, theme: str) -> None:
        try:
            self.fleet.set_theme(theme)
        except (RbeeError, OSError) as exc:
            self.call_from_thread(self.report, f"could not save the theme: {exc}")

    def save_pool(self, old_name: str | None, pool: PoolConfig) -> None:
        """Add a pool (old_name None) or change one, in the config file and the pool list."""
        self._save_pool(old_name, pool)

    @work(thread=True, exit_on_error=False, name="config:pool")
    def _save_pool(self, old_name: str | None, pool: PoolConfig) -> None:
        try:
            self.fleet.save_pool_config(old_name, pool)
        except (RbeeError, OSError) as exc:
            self.call_from_thread(self.report, f"could not save pool {pool.name}: {exc}")
            return
        self.call_from_thread(self._pool_saved, old_name, pool)

    def _pool_saved(self, old_name: str | None, pool: PoolConfig) -> None:
        self.fleet.connect_pool(old_name, pool)
        if old_name is None:
            self.dashboard.pool_added(pool.name)
        self.notify(f"pool {pool.name} saved to {self.fleet.config.path}")

    def ask_host_key(self, pool: str, error: HostKeyUnknown) -> None:
        """Offer to accept an unknown host key, once per pool."""
        if pool in self.asked_host_key:
            return
        self.asked_host_key.add(pool)
        self.host_key_dialog(pool, error)

    @work(exit_on_error=False, name="hostkey")
    async def host_key_dialog(self, pool: str, error: HostKeyUnknown) -> None:
        if await self.push_screen_wait(HostKeyDialog(pool, error.where, error.fingerprint)):
            try:
                await self.fleet.trust(pool, error.fingerprint)
                self.notify(f"{pool}: host key accepted; reconnecting")
            except RbeeError as exc:
                self.asked_host_key.discard(pool)
                self.report(str(exc))

    def on_cluster_dialog_plan_asked(self, message: ClusterDialog.PlanAsked) -> None:
        self.plan_cluster(message.choice)

    @work(exclusive=True, exit_on_error=False, name="cluster:plan")
    async def plan_cluster(self, choice: dict[str, Any]) -> None:
        """Show in the cluster dialog what spawning would place where, or why it cannot."""
        try:
            placement = await self.fleet.clusters.plan(
                choice["model"], choice["pools"], choice["ctx"], choice["spread"]
            )
            text = placement.describe()
        except RbeeError as exc:
            text = f"Cannot place it: {exc}"
        if isinstance(self.screen, ClusterDialog):
            self.screen.show_plan(text)

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

    @work(exclusive=True, exit_on_error=False, name="prompt")
    async def stream_reply(self, pool: str, wid: str, text: str) -> None:
        """Send a quick prompt and stream the reply into the Workers pane."""
        pane = self.dashboard.query_one(WorkersPane)
        pieces: list[str] = []
        pane.reply("…", wid)
        try:
            async for ev in self.fleet.prompt(pool, wid, text):
                if ev["event"] == "token":
                    pieces.append(ev["t"])
                    pane.reply("".join(pieces))
                else:
                    pane.reply(
                        "".join(pieces) + f"\n[{ev['tokens_generated']} tokens, "
                        f"{ev['tokens_per_sec']:.1f} tok/s, first token {ev['ttft_ms']:.0f} ms]"
                    )
        except RbeeError as exc:
            self.report(str(exc))
        self.dashboard.render_workers()
        self.dashboard.query_one("#prompt", Input).clear()
