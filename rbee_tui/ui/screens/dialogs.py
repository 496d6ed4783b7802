"""Modal dialogs: spawn a worker, register a model, confirm, accept a host key, add or edit a pool, split a model
over pools."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from rbee_tui.capacity import MemoryPrediction, WontFit, size
from rbee_tui.config import PoolConfig, parse
from rbee_tui.errors import RbeeError
from rbee_tui.names import BACKENDS, check_id, check_repo, check_repo_file


class Dialog(ModalScreen[Any]):
    """A modal with OK / Cancel; Escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def action_cancel(self) -> None:
        """Close without a result."""
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
        elif event.button.id == "ok":
            self.submit()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.submit()

    def submit(self) -> None:
        """Validate and dismiss with the result (subclasses)."""

    def error(self, message: str) -> None:
        """Show why the form cannot be accepted."""
        self.query_one("#dialog-error", Static).update(message)

    def buttons(self, ok: str = "OK", danger: bool = False) -> ComposeResult:
        yield Static("", id="dialog-error")
        with Horizontal(classes="dialog-buttons"):
            yield Button(ok, variant="error" if danger else "primary", id="ok")
            yield Button("Cancel", id="cancel")

    def field(self, label: str, widget: Any) -> ComposeResult:
        """A labelled field (a placeholder alone vanishes as soon as the user types)."""
        yield Label(label, classes="field-label")
        yield widget


class SpawnDialog(Dialog):
    """Pick model, backend and GPU; what cannot run is said (and Spawn disabled) before anything starts.

    `free_ram` is the room a new worker has on the pool (its memory_budget or reserve, else available memory
    less a margin); a model's need is the memory model's prediction from the catalog (rbee_tui/capacity.py),
    the same figure the node checks at spawn.
    """

    def __init__(
        self,
        pool: str,
        models: list[dict[str, Any]],
        backends: list[str],
        gpus: list[tuple[int, int]],
        free_ram: int | None = None,
    ) -> None:
        super().__init__()
        self.pool, self.models, self.backends, self.gpus, self.free_ram = pool, models, backends, gpus, free_ram

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Spawn a worker on {self.pool}", classes="dialog-title")
            options = [(self._label(m), m["id"]) for m in self.models]
            ready = next((m["id"] for m in self.models if m["downloaded"]), Select.NULL)
            yield from self.field("Model", Select(options, prompt="model", value=ready, id="spawn-model"))
            backends = [(b if b in self.backends else f"{b} (not on {self.pool})", b) for b in BACKENDS]
            yield from self.field("Backend", Select(backends, value="cpu", allow_blank=False, id="spawn-backend"))
            gpu_options = [(f"GPU {i}  ({free / 1024**3:.1f} GiB free)", i) for i, free in self.gpus]
            yield Label("GPU", classes="field-label", id="spawn-gpu-label")
            yield Select(gpu_options or [("no GPU", 0)], value=0, allow_blank=False, id="spawn-gpu")
            yield Static("", id="spawn-memory")
            yield from self.buttons("Spawn")

    def _label(self, m: dict[str, Any]) -> str:
        problem = "" if m["downloaded"] else "  - not downloaded"
        return f"{m['id']}  ({m['name']}){problem}"

    def on_mount(self) -> None:
        self.check()

    def on_select_changed(self, event: Select.Changed) -> None:
        self.check()

    def _problem(self) -> str:
        """Why the chosen model, backend and GPU cannot run here ("" if they can)."""
        model_id = self.query_one("#spawn-model", Select).value
        backend = str(self.query_one("#spawn-backend", Select).value)
        model = next((m for m in self.models if m["id"] == model_id), None)
        if model is None:
            return "Pick a model."
        if not model["downloaded"]:
            return f"Model {model['id']} is not downloaded: download it first (d in the catalog)."
        if backend not in model["backends"]:
            return f"Model {model['id']} doesn't support the {backend} backend."
        if backend not in self.backends:
            return f"Backend {backend} is not available on {self.pool} (it has {', '.join(self.backends)})."
        memory = model.get("memory") or {}
        if backend == "cuda":
            gpu = self.query_one("#spawn-gpu", Select).value
            free = next((f for i, f in self.gpus if i == gpu), None)
            if free is None:
                return f"{self.pool} has no GPU to offload to."
            need = int(memory.get("vram") or model.get("size_bytes") or 0)
            if need and need > free:
                return f"{WontFit(need, free, f'GPU {gpu} of {self.pool}', what=model['id']).message}."
        else:
            need = int(memory.get("total") or model.get("size_bytes") or 0)
            if self.free_ram is not None and need > self.free_ram:
                return f"{WontFit(need, self.free_ram, self.pool, what=model['id']).message}."
        return ""

    def _memory_line(self) -> str:
        """The chosen model's predicted memory against the pool's room, shown before Spawn is pressed."""
        model = next((m for m in self.models if m["id"] == self.query_one("#spawn-model", Select).value), None)
        memory = (model or {}).get("memory")
        if not memory:
            return ""
        room = f"; {size(self.free_ram)} free for workers on {self.pool}" if self.free_ram is not None else ""
        return f"Predicted: {MemoryPrediction.from_json(memory).describe()}{room}"

    def check(self) -> None:
        """Say what cannot run, and offer the GPU only where it means something."""
        cuda = self.query_one("#spawn-backend", Select).value == "cuda"
        self.query_one("#spawn-gpu", Select).display = cuda
        self.query_one("#spawn-gpu-label", Label).display = cuda
        problem = self._problem()
        self.error(problem)
        self.query_one("#spawn-memory", Static).update(self._memory_line())
        self.query_one("#ok", Button).disabled = bool(problem)

    def submit(self) -> None:
        if problem := self._problem():
            return self.error(problem)
        backend = str(self.query_one("#spawn-backend", Select).value)
        gpu = self.query_one("#spawn-gpu", Select).value if backend == "cuda" else 0
        self.dismiss({"model": self.query_one("#spawn-model", Select).value, "backend": backend, "gpu": int(gpu)})
        return None


class RegisterDialog(Dialog):
    """Register a model from a hub repository."""

    FIELDS = (
        ("id", "id, e.g. gemma-2b"),
        ("repo", "repo, e.g. google/gemma-2b-GGUF"),
        ("file", "file, e.g. gemma-2b.Q4_K_M.gguf"),
        ("name", "display name (optional)"),
        ("architecture", "architecture (optional)"),
        ("backends", "backends (default cpu,cuda,metal)"),
    )

    def __init__(self, pool: str) -> None:
        super().__init__()
        self.pool = pool

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Register a model on {self.pool}", classes="dialog-title")
            for key, hint in self.FIELDS:
                yield from self.field(key.capitalize(), Input(placeholder=hint, id=f"reg-{key}"))
            yield from self.buttons("Register")

    def on_mount(self) -> None:
        self.query_one("#reg-id", Input).focus()

    def submit(self) -> None:
        values = {key: self.query_one(f"#reg-{key}", Input).value.strip() for key, _ in self.FIELDS}
        try:
            check_id(values["id"])
            check_repo(values["repo"])
            check_repo_file(values["file"])
            if not values["file"].endswith(".gguf"):
                raise RbeeError("the file must be a .gguf file")
            for b in filter(None, (x.strip() for x in values["backends"].split(","))):
                if b not in BACKENDS:
                    raise RbeeError(f"unknown backend {b!r}: choose from {', '.join(BACKENDS)}")
        except RbeeError as exc:
            return self.error(str(exc))
        self.dismiss(values)
        return None


class ConfirmDialog(Dialog):
    """Yes or no."""

    def __init__(self, question: str, ok: str = "Yes", safe_first: bool = False) -> None:
        super().__init__()
        self.question, self.ok, self.safe_first = question, ok, safe_first

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-title")
            yield from self.buttons(self.ok, danger=self.safe_first)

    def on_mount(self) -> None:
        # What Enter does at once: the safe answer for what cannot be undone. After the first refresh: a dialog
        # pushed while the app is busy may be mounted before its buttons are.
        self.call_after_refresh(self._focus_answer)

    def _focus_answer(self) -> None:
        for button in self.query("#cancel" if self.safe_first else "#ok").results(Button):
            button.focus()

    def submit(self) -> None:
        self.dismiss(True)


class HostKeyDialog(ConfirmDialog):
    """An unknown SSH host key: show the fingerprint, accept or refuse."""

    def __init__(self, pool: str, where: str, fingerprint: str) -> None:
        super().__init__(
            f"The host key of {pool} ({where}) is unknown.\nIts fingerprint is {fingerprint}.\n"
            "Accept it only if it matches the machine's own (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub).",
            ok="Accept",
            safe_first=True,
        )


class PoolDialog(Dialog):
    """Add or edit a pool; the entry is validated as the config file would be."""

    FIELDS = (
        ("name", "Name", "e.g. workstation"),
        ("transport", "Transport", "local or ssh"),
        ("host", "Host", "e.g. 192.168.1.20 or gpu-box"),
        ("port", "Port", "22"),
        ("user", "User", "the SSH user (default: yours)"),
        ("identity_file", "Identity file", "e.g. ~/.ssh/id_ed25519"),
        ("backends", "Backends", "e.g. cpu,cuda"),
        ("models_dir", "Models dir", "on the pool (default: its own)"),
        ("hive_command", "Hive command", "rbee-hive"),
        ("llama_server", "llama-server", "path of llama.cpp's server on the pool"),
        ("known_hosts", "Known hosts", "~/.ssh/known_hosts"),
    )

    def __init__(self, pool: PoolConfig | None = None, taken: list[str] | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.taken = taken or []

    def compose(self) -> ComposeResult:
        current = self.pool.to_toml() if self.pool else {"transport": "ssh", "port": 22, "backends": ["cpu"]}
        with VerticalScroll(classes="dialog"):
            yield Label(f"Edit pool {self.pool.name}" if self.pool else "Add a pool", classes="dialog-title")
            with Grid(classes="form"):
                for key, label, hint in self.FIELDS:
                    value = current.get(key, "")
                    text = ",".join(value) if isinstance(value, list) else str(value) if value != "" else ""
                    yield Label(label, classes="field-label", id=f"pool-label-{key}")
                    yield Input(text, placeholder=hint, id=f"pool-{key}")
            yield from self.buttons("Save")

    SSH_ONLY = ("host", "port", "user", "identity_file", "known_hosts")

    def on_mount(self) -> None:
        self.query_one("#pool-name", Input).focus()
        self._show_transport()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "pool-transport":
            self._show_transport()

    def _show_transport(self) -> None:
        """Offer the SSH fields only for an SSH pool."""
        ssh = self.query_one("#pool-transport", Input).value.strip() != "local"
        for key in self.SSH_ONLY:
            for widget in (self.query_one(f"#pool-{key}", Input), self.query_one(f"#pool-label-{key}", Label)):
                widget.display = ssh

    def submit(self) -> None:
        name = self.query_one("#pool-name", Input).value.strip()
        if name in self.taken:
            return self.error(f"a pool named {name} exists: pick another name (E edits it)")
        raw: dict[str, Any] = {}
        for key, _, _ in self.FIELDS:
            value = self.query_one(f"#pool-{key}", Input).value.strip()
            if not value or not self.query_one(f"#pool-{key}", Input).display:
                continue
            if key == "port":
                if not value.isdigit():
                    return self.error(f"{key} must be a number")
                raw[key] = int(value)
            elif key == "backends":
                raw[key] = [b.strip() for b in value.split(",") if b.strip()]
            else:
                raw[key] = value
        try:
            pool = parse({"pools": [raw]}, "this form").pools[0]
        except RbeeError as exc:
            return self.error(str(exc).replace("this form: pools[0]: ", ""))
        self.dismiss(pool)
        return None


class ClusterDialog(Dialog):
    """Split a model over pools: pick the model (on the head), the pools in order and the context; the plan is
    shown (Plan) before anything starts (Spawn)."""

    @dataclass
    class PlanAsked(Message):
        """The user asked what spawning would place where."""

        choice: dict[str, Any]

    def __init__(
        self, head: str, models: list[dict[str, Any]], pools: list[str], direct: list[str] | None = None
    ) -> None:
        super().__init__()
        self.head, self.models, self.pools = head, models, pools
        self.direct = direct or []  # pools with rpc_host: their RPC link skips SSH

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog"):
            yield Label(
                f"Split a model over pools (the head, {self.head}, needs the model file)", classes="dialog-title"
            )
            ready = [(f"{m['id']}  ({m['name']})", m["id"]) for m in self.models if m["downloaded"]]
            first = ready[0][1] if ready else Select.NULL
            yield from self.field(
                "Model", Select(ready, prompt="a model downloaded on the head", value=first, id="cl-model")
            )
            yield from self.field("Pools, head first", Input(",".join(self.pools), id="cl-pools"))
            yield from self.field("Context (tokens)", Input("2048", id="cl-ctx"))
            policies = [
                ("fewest nodes (each extra node adds a network hop per token)", "fewest"),
                ("spread over every pool, by free memory", "spread"),
            ]
            yield from self.field("Placement", Select(policies, value="fewest", allow_blank=False, id="cl-policy"))
            if self.direct:
                yield Static(
                    f"Warning: {', '.join(self.direct)} set rpc_host: their RPC server listens on that address, "
                    "with no authentication and no encryption. Anyone who reaches it can use the node's memory "
                    "and compute and read what passes. Use it only on a network you trust.",
                    id="cl-warning",
                )
            yield Static("Plan shows what goes where before anything starts.", id="cl-plan")
            yield Static("", id="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Plan", id="plan")
                yield Button("Spawn", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#cl-model", Select).focus()

    def _choice(self) -> dict[str, Any] | None:
        model = self.query_one("#cl-model", Select).value
        pools = [p.strip() for p in self.query_one("#cl-pools", Input).value.split(",") if p.strip()]
        ctx = self.query_one("#cl-ctx", Input).value.strip()
        if model is Select.NULL:
            self.error(f"No model is downloaded on {self.head}: download one there first.")
            return None
        unknown = [p for p in pools if p not in self.pools]
        if not pools or unknown:
            self.error(f"Unknown pool(s): {', '.join(unknown)}" if unknown else "Name at least one pool.")
            return None
        if not ctx.isdigit() or not 64 <= int(ctx) <= 1_048_576:
            self.error("The context is a number of tokens, e.g. 2048.")
            return None
        self.error("")
        spread = self.query_one("#cl-policy", Select).value == "spread"
        return {"model": str(model), "pools": pools, "ctx": int(ctx), "spread": spread}

    def on_button_pressed(self, event: Button.Pressed) -> None:
        # Textual runs Dialog's handler after this one (OK and Cancel); Plan is this dialog's own.
        if event.button.id == "plan":
            event.prevent_default()
            if (choice := self._choice()) is not None:
                self.query_one("#cl-plan", Static).update("planning…")
                self.post_message(self.PlanAsked(choice))

    def show_plan(self, text: str) -> None:
        """What spawning would do, or why it cannot."""
        self.query_one("#cl-plan", Static).update(text)

    def submit(self) -> None:
        if (choice := self._choice()) is not None:
            self.dismiss(choice)
