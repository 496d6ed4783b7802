"""The main screen: pools on the left; the selected pool's catalog, downloads, workers and gauges on the right.

It renders what the Fleet (the service layer) knows and turns the panes' requests into service calls; the
panes own their keys, so a key acts only where its pane has the focus.
"""

from __future__ import annotations

import contextlib
import time
from itertools import islice
from typing import TYPE_CHECKING, Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import DataTable, Footer, Header, ListView, TabbedContent, TabPane

from rbee_tui.catalog import human_size
from rbee_tui.config import PoolConfig
from rbee_tui.errors import RbeeError
from rbee_tui.fleet import (
    CatalogChanged,
    ClusterChanged,
    DownloadChanged,
    Fleet,
    FleetEvent,
    GatewayChanged,
    PoolStateChanged,
    SampleArrived,
    WorkersChanged,
)
from rbee_tui.ui.format import duration, gib
from rbee_tui.ui.screens.dialogs import ClusterDialog, PoolDialog, RegisterDialog, SpawnDialog
from rbee_tui.ui.widgets.catalog import CatalogPane
from rbee_tui.ui.widgets.clusters import ClustersPane
from rbee_tui.ui.widgets.downloads import DownloadsPane
from rbee_tui.ui.widgets.gauges import HISTORY_POINTS, GaugesPane
from rbee_tui.ui.widgets.line import Line
from rbee_tui.ui.widgets.pools import PoolList
from rbee_tui.ui.widgets.workers import WorkersPane

if TYPE_CHECKING:
    from rbee_tui.app import RbeeApp

PANES = ("catalog", "downloads", "workers", "gauges")


class DashboardScreen(Screen[None]):
    """Pools and the selected pool's panes."""

    BINDINGS = [
        Binding("1", "pane('catalog')", "Catalog", show=False),
        Binding("2", "pane('downloads')", "Downloads", show=False),
        Binding("3", "pane('workers')", "Workers", show=False),
        Binding("4", "pane('gauges')", "Gauges", show=False),
        Binding("5", "pane('clusters')", "Clusters", show=False),
        Binding("o", "overview", "Overview"),
        Binding("m", "matrix", "Matrix"),
        Binding("G", "gateway", "Gateway", show=False),
        Binding("g", "capacity", "Capacity"),
        Binding("a", "add_pool", "Add pool", show=False),
        Binding("E", "edit_pool", "Edit pool", show=False),
        Binding("e", "errors", "Errors", show=False),
        Binding("r", "refresh", "Refresh", show=False),
    ]
    HELP_TITLE = "Dashboard"
    HELP_INTRO = """\
# rbee-tui

Pools are on the left (`Up`/`Down` or `k`/`j` move, Enter or a click goes into the pool's panes, `Tab` moves
between the list and the panes); the selected pool's **Catalog**,
**Downloads**, **Workers** and **Gauges** on the right, and the **Clusters** this dashboard runs (models
split over several pools). A pane's keys work while its table has the focus (`1`-`5` show a pane and focus
it). Everything also works with the mouse, and **Ctrl+P** finds any action of the screen in view.
"""

    app: RbeeApp

    def __init__(self, fleet: Fleet) -> None:
        super().__init__()
        self.fleet = fleet
        self.selected = fleet.config.pools[0].name
        self._stale: set[str] = set()  # panes changed while hidden: drawn when their tab is shown
        self._ready = False  # composed and mounted: events before that are drawn by on_mount

    @classmethod
    def help_sections(cls) -> list[tuple[str, list[Binding]]]:
        """The keys of this screen and of each pane, as help and the command palette list them."""
        return [
            (cls.HELP_TITLE, list(cls.BINDINGS)),  # type: ignore[arg-type]
            *(
                (pane.HELP_TITLE, list(pane.BINDINGS))  # type: ignore[misc]
                for pane in (CatalogPane, DownloadsPane, WorkersPane, ClustersPane)
            ),
        ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            yield PoolList([p.name for p in self.fleet.config.pools])
            with TabbedContent(id="panes", initial="tab-catalog"):
                with TabPane("Catalog", id="tab-catalog"):
                    yield CatalogPane(id="catalog-pane")
                with TabPane("Downloads", id="tab-downloads"):
                    yield DownloadsPane(id="downloads")
                with TabPane("Workers", id="tab-workers"):
                    yield WorkersPane(id="workers-pane")
                with TabPane("Gauges", id="tab-gauges"):
                    yield GaugesPane(id="gauges")
                with TabPane("Clusters", id="tab-clusters"):
                    yield ClustersPane(id="clusters-pane")
        yield Line("", id="status-line")
        yield Footer(compact=True)  # the keys still fit at 80 columns

    def on_mount(self) -> None:
        pools = self.query_one(PoolList)
        pools.index = 0
        pools.focus()
        self._ready = True
        self.redraw()

    def on_screen_resume(self) -> None:
        """Shown again after another screen covered it: draw what changed meanwhile."""
        self.redraw()

    # -- what the service layer reports --------------------------------------------------------------------

    def apply(self, event: FleetEvent) -> None:
        """Redraw what `event` touches."""
        if not self._ready or not self.is_attached:
            return
        if isinstance(event, SampleArrived | PoolStateChanged) and self._covered():
            return  # nobody sees it: on_screen_resume draws everything when it shows again
        with contextlib.suppress(NoMatches):  # NoMatches: the screen is being taken down (quitting)
            self._apply(event)

    def _covered(self) -> bool:
        """Whether a screen above hides this one whole (a dialog's see-through backdrop does not). Textual's
        `is_current` holds for the screen just below the top whatever that covers, so it cannot tell."""
        stack = self.app.screen_stack
        return self in stack and any(s.styles.background.a == 1 for s in stack[stack.index(self) + 1 :])

    def _apply(self, event: FleetEvent) -> None:
        match event:
            case DownloadChanged(download=d):
                self.query_one(DownloadsPane).show(d)
            case CatalogChanged(pool=pool):
                if pool == self.selected:
                    self.render_catalog()
                else:  # the "On pools" column of the selected pool's catalog may change too
                    self._stale.add("catalog")
            case WorkersChanged(pool=pool) if pool == self.selected:
                self.render_workers()
            case ClusterChanged():
                self.render_clusters()
            case GatewayChanged():
                self.render_status()
            case SampleArrived(pool=pool) | PoolStateChanged(pool=pool):
                self.render_pool_row(pool)
                if self.fleet.clusters.clusters:
                    self.render_clusters()  # each node's memory as it loads
                if pool == self.selected:
                    self.render_gauges()
                    self.render_status()
                    self.render_workers()
                    if isinstance(event, PoolStateChanged):
                        self.render_catalog()

    def redraw(self) -> None:
        """Everything, as the service layer knows it now."""
        if not self._ready:
            return
        for pool in self.fleet.clients:
            self.render_pool_row(pool)
        self.render_all()

    # -- rendering -----------------------------------------------------------------------------------------

    def _lost(self) -> str:
        """Why the selected pool shows nothing live ("" when connected)."""
        view = self.fleet.client(self.selected).view
        if view.state == "connected":
            return ""
        if view.state == "lost":
            return f"pool {self.selected} is lost: {view.reason or 'no answer'} (it reconnects by itself)"
        return f"pool {self.selected} is {view.state}…" + (f" ({view.reason})" if view.reason else "")

    def render_pool_row(self, pool: str) -> None:
        """A pool's row in the list (the list redraws it only if it changed and is in view)."""
        view = self.fleet.client(pool).view
        self.query_one(PoolList).show(pool, view.state, view.reason, view.last_sample)

    def render_status(self) -> None:
        """The line under the panes: the selected pool's state and host."""
        view = self.fleet.client(self.selected).view
        st = view.status
        where = f"{st.get('hostname', '?')} ({st.get('os', '?')})" if st else ""
        text = f"{self.selected}: {view.state}" + (f" - {view.reason}" if view.reason else "") + f"  {where}"
        if gateway := self.fleet.gateway_status():  # redrawn with each sample, so its rate stays current
            text = f"{gateway}  |  {text}"  # first: a long reason or host must not push it off an 80-column line
        self.query_one("#status-line", Line).update(text)

    def _showing(self, pane: str) -> bool:
        """Whether `pane` is on screen; if not, it is drawn when its tab is shown. Drawing a hidden widget makes
        Textual lay out the whole screen again on the next frame, and a key pressed meanwhile waits for it."""
        shown = self.query_one(TabbedContent).active == f"tab-{pane}"
        if not shown:
            self._stale.add(pane)
        return shown

    @on(TabbedContent.TabActivated, "#panes")
    def _pane_shown(self, event: TabbedContent.TabActivated) -> None:
        pane = (event.pane.id or "").removeprefix("tab-")
        if not isinstance(self.focused, PoolList):
            # A tab clicked (or moved to on the tab bar): its keys work at once, where its footer says.
            self._focus_target(pane).focus()
        if pane in self._stale:
            self._stale.discard(pane)
            {
                "catalog": self.render_catalog,
                "workers": self.render_workers,
                "gauges": self.render_gauges,
                "clusters": self.render_clusters,
            }.get(pane, lambda: None)()

    def render_catalog(self) -> None:
        """The selected pool's catalog."""
        if not self._showing("catalog"):
            return
        doc = self.fleet.catalogs.get(self.selected)
        rows = [
            (
                m["id"],
                (
                    m["id"],
                    "✅" if m["downloaded"] else "❌",
                    human_size(m["size_bytes"]),
                    human_size(m["memory"]["total"]) if m.get("memory") else "-",  # a worker's predicted memory
                    m["name"],
                    m["architecture"],
                    ",".join(self.fleet.pools_having(m["id"])) or "-",
                    ",".join(m["backends"]),
                ),
            )
            for m in (doc or {}).get("models", [])
        ]
        empty = self._lost() if not rows else ""
        if not rows and not empty:
            empty = "reading the catalog…" if doc is None else "No models: press n to register one."
        self.query_one(CatalogPane).show(rows, empty)

    def render_workers(self) -> None:
        """The selected pool's workers, with their live memory and last tokens/s."""
        if not self._showing("workers"):
            return
        view = self.fleet.client(self.selected).view
        sample = view.last_sample
        rows = []
        for w in [*view.workers, *self.fleet.pending.get(self.selected, [])]:
            live = sample.worker(w["id"]) if sample else None
            rss = live.rss_bytes if live else w.get("rss_bytes")
            vram = live.vram_bytes if live else None
            tps = self.fleet.last_tps.get((self.selected, w["id"], w["started_at"]))
            # The full reason is in the log (l); the table keeps its columns on screen.
            reason = str(w.get("reason", "")).split(":")[0]
            state = w["state"] if w["state"] != "exited" else f"exited ({reason[:20]})" if reason else "exited"
            cells = (
                w["id"],
                w["model"],
                state,
                w["backend"],
                str(w["gpu"]) if w["backend"] != "cpu" else "-",
                str(w["port"]),
                duration(time.time() - w["started_at"]),
                human_size(rss) if rss else "-",
                human_size(vram) if vram else "-",
                f"{tps:.1f}" if tps else "-",
            )
            rows.append((w["id"], cells))
        empty = self._lost() or ("" if rows else f"No workers on {self.selected}: press s to spawn one.")
        self.query_one(WorkersPane).show(rows, empty)

    def render_gauges(self) -> None:
        """The selected pool's gauges (or why there are none)."""
        if not self._showing("gauges"):
            return
        view = self.fleet.client(self.selected).view
        cpus = int(view.status.get("cpu_count") or 1)
        # Only what the sparklines show: copying the whole 20-minute history on every sample cost frames.
        recent = list(islice(view.history, max(len(view.history) - HISTORY_POINTS, 0), None))
        self.query_one(GaugesPane).render_sample(view.last_sample, recent, cpus, self._lost())

    def render_clusters(self) -> None:
        """Every cluster this dashboard runs, and the highlighted one's nodes with their memory now."""
        if not self._showing("clusters"):
            return
        board = self.fleet.clusters
        pane = self.query_one(ClustersPane)
        rows = []
        for model in board.clusters:
            d = board.describe(model)
            cells = (
                model,
                d["state"],
                d["head"],
                str(d.get("port", "-")),
                str(len(d.get("nodes", []))),
                str(d.get("policy", "-")),
                str(d.get("ctx", "-")),
            )
            rows.append((model, cells))
        pane.show(rows)
        model = pane.selected()
        if model is None:
            pane.show_nodes("", [])
            return
        d = board.describe(model)
        note = f"{model}: {d['state']}" + (f" - {d['reason']}" if d.get("reason") else "")
        coordinator = d.get("coordinator") or {}
        head = self.fleet.clients.get(d["head"])
        worker = next((w for w in head.view.workers if w["id"] == coordinator.get("id")), None) if head else None
        if worker is not None:
            tps = self.fleet.last_tps.get((d["head"], worker["id"], worker["started_at"]))
            note += f"  coordinator {worker['id']} {worker['state']}" + (f", last {tps:.1f} tok/s" if tps else "")
        if d.get("url"):
            note += f"  {d['url']} (OpenAI and /execute, like any worker)"
        nodes = []
        for n in d.get("nodes", []):
            sample = self.fleet.client(n["pool"]).view.last_sample if n["pool"] in self.fleet.clients else None
            now = f"{gib(sample.ram.used)} / {gib(sample.ram.total)}" if sample else "-"  # as the gauges say it
            role = ", ".join(r for r, on in (("coordinator", n.get("coordinator")), ("output", n.get("output"))) if on)
            cells = (
                n["pool"],
                f"{n['layers'][0]}-{n['layers'][1]}",
                f"{100 * n.get('share', 0):.0f}%",
                human_size(n.get("memory_bytes") or 0),
                now,
                str(n.get("rpc_port") or "-"),
                role or "-",
            )
            nodes.append((n["pool"], cells))
        pane.show_nodes(note, nodes)

    @on(ClustersPane.Shown)
    def _cluster_shown(self) -> None:
        self.render_clusters()

    @on(ClustersPane.NewAsked)
    def _new_cluster(self) -> None:
        head = self.selected
        connected = [p for p, c in self.fleet.clients.items() if c.view.state == "connected"]
        if head not in connected:
            self.app.report(self._lost() or f"pool {head} is not connected")
            return
        pools = [head, *(p for p in connected if p != head)]
        models = self.fleet.catalogs.get(head, {"models": []})["models"]

        def done(choice: dict[str, Any] | None) -> None:
            if not choice:
                return
            try:
                self.fleet.clusters.spawn(choice["model"], choice["pools"], choice["ctx"], choice["spread"])
            except RbeeError as exc:
                self.app.report(str(exc))
                return
            self.focus_pane("clusters")
            self.app.notify(f"starting a cluster of {choice['model']} over {', '.join(choice['pools'])}")

        direct = [p for p in pools if self.fleet.client(p).pool.rpc_host]
        self.app.push_screen(ClusterDialog(head, models, pools, direct), done)

    @on(ClustersPane.StopAsked)
    def _stop_cluster(self, message: ClustersPane.StopAsked) -> None:
        model = message.model
        self.app.confirm(
            f"Stop the cluster of {model}? The coordinator stops first, then every RPC server.",
            "Stop",
            lambda: self.app.run_task(self.fleet.clusters.stop(model), f"cluster of {model} stopped"),
        )

    def render_all(self) -> None:
        """Everything of the selected pool (and the clusters)."""
        self.render_catalog()
        self.render_workers()
        self.render_gauges()
        self.render_clusters()
        self.render_status()

    # -- the pool list -------------------------------------------------------------------------------------

    @on(PoolList.PoolShown)
    def _pool_shown(self, message: PoolList.PoolShown) -> None:
        # The status line names the pool; a header subtitle would cost a layout pass of the screen per switch.
        self.selected = message.pool
        self.render_all()

    @on(PoolList.PoolEntered)
    def _pool_chosen(self) -> None:
        """Enter or a click on a pool: go into its panes."""
        self.focus_pane(self.query_one(TabbedContent).active.removeprefix("tab-"))

    def show_pool(self, pool: str) -> None:
        """Select `pool` in the list (from the overview)."""
        pools = self.query_one(PoolList)
        names = [p.name for p in self.fleet.config.pools]
        if pool in names:
            pools.index = names.index(pool)

    # -- keys of the screen --------------------------------------------------------------------------------

    def _focus_target(self, pane: str) -> Widget:
        """The widget of a pane whose focus makes its keys work."""
        return {
            "catalog": lambda: self.query_one("#catalog", DataTable),
            "downloads": lambda: self.query_one("#downloads-list", ListView),
            "workers": lambda: self.query_one("#workers", DataTable),
            "gauges": lambda: self.query_one(GaugesPane),
            "clusters": lambda: self.query_one("#clusters", DataTable),
        }[pane]()

    def focus_pane(self, pane: str) -> None:
        """Show a pane and put the focus on its table, where its keys act."""
        self.query_one(TabbedContent).active = f"tab-{pane}"
        self._focus_target(pane).focus()

    def action_pane(self, pane: str) -> None:
        """Show a pane and focus its table."""
        self.focus_pane(pane)

    def action_overview(self) -> None:
        """All pools side by side."""
        self.app.open_overview()

    def action_matrix(self) -> None:
        """The job board: every model on every pool and backend."""
        self.app.open_matrix()

    def action_capacity(self) -> None:
        """The capacity view: tokens/s against concurrency, memory per model, models packed together."""
        self.app.open_capacity()

    def action_gateway(self) -> None:
        """Start or stop the gateway: one OpenAI endpoint for every pool's workers (its address on the status
        line); stopping it stops the workers it started."""
        done = "gateway stopped" if self.fleet.gateway is not None else "gateway started: its address is below"
        self.app.run_task(self.fleet.toggle_gateway(), done)

    def action_errors(self) -> None:
        """Every error so far, with details."""
        self.app.open_errors()

    def action_refresh(self) -> None:
        """Read the selected pool's catalog and workers again."""
        self.app.run_task(self.fleet.refresh_catalog(self.selected))
        self.app.run_task(self.fleet.client(self.selected).workers())

    def action_add_pool(self) -> None:
        """Add a pool (a form that writes the config)."""

        def done(pool: PoolConfig | None) -> None:
            if pool is not None:
                self.app.save_pool(None, pool)

        self.app.push_screen(PoolDialog(taken=[p.name for p in self.fleet.config.pools]), done)

    def action_edit_pool(self) -> None:
        """Edit the selected pool's entry in the config."""
        name = self.selected

        def done(pool: PoolConfig | None) -> None:
            if pool is not None:
                self.app.save_pool(name, pool)

        taken = [p.name for p in self.fleet.config.pools if p.name != name]
        self.app.push_screen(PoolDialog(self.fleet.client(name).pool, taken=taken), done)

    def pool_added(self, name: str) -> None:
        """A new pool's row in the list."""
        pools = self.query_one(PoolList)
        pools.add(name)

    # -- what the panes ask for ----------------------------------------------------------------------------

    def _model(self, model_id: str) -> dict[str, Any] | None:
        doc = self.fleet.catalogs.get(self.selected, {"models": []})
        return next((m for m in doc["models"] if m["id"] == model_id), None)

    @on(CatalogPane.DownloadAsked)
    def _download(self, message: CatalogPane.DownloadAsked) -> None:
        model = self._model(message.model)
        if model is not None and model["downloaded"]:
            self.app.notify(f"{message.model} is already downloaded on {self.selected}")
            return
        try:
            self.fleet.download(self.selected, message.model)
        except RbeeError as exc:
            self.app.report(str(exc))
            return
        self.app.notify(f"downloading {message.model} on {self.selected} (2 shows the progress)")

    @on(CatalogPane.VerifyAsked)
    def _verify(self, message: CatalogPane.VerifyAsked) -> None:
        model = self._model(message.model)
        if model is not None and not model["downloaded"]:
            self.app.report(f"{message.model} is not downloaded on {self.selected}: nothing to verify (d downloads it)")
            return
        self.app.run_task(self.fleet.verify(self.selected, message.model), f"{message.model} verified: files intact")

    @on(CatalogPane.RegisterAsked)
    def _register(self) -> None:
        pool = self.selected

        def done(values: dict[str, str] | None) -> None:
            if values:
                self.app.run_task(
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

        self.app.push_screen(RegisterDialog(pool), done)

    @on(CatalogPane.UnregisterAsked)
    def _unregister(self, message: CatalogPane.UnregisterAsked) -> None:
        pool, model = self.selected, message.model
        self.app.confirm(
            f"Unregister {model} from {pool}? Its files stay.",
            "Unregister",
            lambda: self.app.run_task(self.fleet.unregister(pool, model), f"unregistered {model} from {pool}"),
        )

    @on(DownloadsPane.CancelAsked)
    def _cancel_download(self, message: DownloadsPane.CancelAsked) -> None:
        download = self.fleet.downloads.get(message.key)
        if download is None or download.state not in ("starting", "running"):
            self.app.notify("that download is not running", severity="warning")
            return
        self.fleet.cancel_download(message.key)

    @on(WorkersPane.SpawnAsked)
    def _spawn(self) -> None:
        pool = self.selected
        view = self.fleet.client(pool).view
        if view.state != "connected":
            self.app.report(self._lost())
            return
        models = self.fleet.catalogs.get(pool, {"models": []})["models"]
        sample = view.last_sample
        free_ram = self.fleet.worker_room(pool)  # the pool's budget or reserve, else available less a margin
        if sample and sample.gpus:
            gpus = [(g.index, g.memory_free or 0) for g in sample.gpus]
        else:  # no sample yet: what the node said at connect
            gpus = [(g.get("index", i), g.get("memory_total") or 0) for i, g in enumerate(view.status.get("gpus", []))]

        def done(choice: dict[str, Any] | None) -> None:
            if choice:
                self.app.run_task(
                    self.fleet.spawn(pool, choice["backend"], choice["model"], choice["gpu"]),
                    f"{choice['model']} is ready on {pool}",
                )

        backends = view.status.get("backends", ["cpu"])
        self.app.push_screen(SpawnDialog(pool, models, backends, gpus, free_ram), done)

    @on(WorkersPane.StopAsked)
    def _stop(self, message: WorkersPane.StopAsked) -> None:
        pool, wid = self.selected, message.worker
        self.app.confirm(
            f"Stop {wid} on {pool}?", "Stop", lambda: self.app.run_task(self.fleet.stop(pool, wid), f"{wid} stopped")
        )

    @on(WorkersPane.LogAsked)
    def _log(self, message: WorkersPane.LogAsked) -> None:
        self.app.open_worker_log(self.selected, message.worker)

    @on(WorkersPane.PromptSent)
    def _prompt(self, message: WorkersPane.PromptSent) -> None:
        self.app.stream_reply(self.selected, message.worker, message.text)
