"""Modal dialogs: spawn a worker, register a model, confirm, accept a host key, add or edit a pool."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

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

    def buttons(self, ok: str = "OK") -> ComposeResult:
        yield Static("", id="dialog-error")
        with Horizontal(classes="dialog-buttons"):
            yield Button(ok, variant="primary", id="ok")
            yield Button("Cancel", id="cancel")


class SpawnDialog(Dialog):
    """Pick model, backend and GPU; what cannot run is explained before anything starts."""

    def __init__(self, pool: str, models: list[dict[str, Any]], backends: list[str], gpus: int) -> None:
        super().__init__()
        self.pool, self.models, self.backends, self.gpus = pool, models, backends, gpus

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Spawn a worker on {self.pool}", classes="dialog-title")
            options = [(f"{m['id']}  ({m['name']})", m["id"]) for m in self.models]
            ready = next((m["id"] for m in self.models if m["downloaded"]), Select.NULL)
            yield Select(options, prompt="model", value=ready, id="spawn-model")
            yield Select([(b, b) for b in BACKENDS], value="cpu", allow_blank=False, id="spawn-backend")
            yield Input("0", placeholder="GPU index", id="spawn-gpu")
            yield from self.buttons("Spawn")

    def submit(self) -> None:
        model_id = self.query_one("#spawn-model", Select).value
        backend = str(self.query_one("#spawn-backend", Select).value)
        gpu_text = self.query_one("#spawn-gpu", Input).value.strip() or "0"
        model = next((m for m in self.models if m["id"] == model_id), None)
        if model is None:
            return self.error("Pick a model.")
        if not model["downloaded"]:
            return self.error(f"Model {model['id']} not downloaded: download it first (d in the catalog).")
        if backend not in model["backends"]:
            return self.error(f"Model {model['id']} doesn't support {backend} backend.")
        if backend not in self.backends:
            return self.error(f"Backend {backend} is not available on {self.pool} (it has {', '.join(self.backends)}).")
        if not gpu_text.isdigit():
            return self.error("The GPU is a number: 0, 1, …")
        if backend == "cuda" and int(gpu_text) >= self.gpus:
            return self.error(f"GPU {gpu_text} does not exist on {self.pool} ({self.gpus} GPU(s)).")
        self.dismiss({"model": model["id"], "backend": backend, "gpu": int(gpu_text)})
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
                yield Input(placeholder=hint, id=f"reg-{key}")
            yield from self.buttons("Register")

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

    def __init__(self, question: str, ok: str = "Yes") -> None:
        super().__init__()
        self.question, self.ok = question, ok

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-title")
            yield from self.buttons(self.ok)

    def submit(self) -> None:
        self.dismiss(True)


class HostKeyDialog(ConfirmDialog):
    """An unknown SSH host key: show the fingerprint, accept or refuse."""

    def __init__(self, pool: str, where: str, fingerprint: str) -> None:
        super().__init__(
            f"The host key of {pool} ({where}) is unknown.\nIts fingerprint is {fingerprint}.\n"
            "Accept it only if it matches the machine's own (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub).",
            ok="Accept",
        )


class PoolDialog(Dialog):
    """Add or edit a pool; the entry is validated as the config file would be."""

    FIELDS = (
        ("name", "name"),
        ("transport", "transport: local or ssh"),
        ("host", "host"),
        ("port", "port (22)"),
        ("user", "user"),
        ("identity_file", "identity file, e.g. ~/.ssh/id_ed25519"),
        ("backends", "backends, e.g. cuda"),
        ("gpus", "GPU count"),
        ("models_dir", "models dir"),
    )

    def __init__(self, pool: PoolConfig | None = None) -> None:
        super().__init__()
        self.pool = pool

    def compose(self) -> ComposeResult:
        current = self.pool.to_toml() if self.pool else {"transport": "ssh", "port": 22, "backends": ["cpu"]}
        with VerticalScroll(classes="dialog"):
            yield Label("Edit pool" if self.pool else "Add a pool", classes="dialog-title")
            with Grid(classes="form"):
                for key, hint in self.FIELDS:
                    value = current.get(key, "")
                    text = ",".join(value) if isinstance(value, list) else str(value) if value != "" else ""
                    yield Label(key)
                    yield Input(text, placeholder=hint, id=f"pool-{key}")
            yield from self.buttons("Save")

    def submit(self) -> None:
        raw: dict[str, Any] = {}
        for key, _ in self.FIELDS:
            value = self.query_one(f"#pool-{key}", Input).value.strip()
            if not value:
                continue
            if key in ("port", "gpus"):
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
