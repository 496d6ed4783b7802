"""The themes: Textual Theme objects (colours) registered at start; their .tcss files live in themes/."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from textual.theme import Theme

# Shipped inside the package so an installed wheel has them; in a source checkout rbee_tui/themes_data is a
# symlink to the top-level themes/, which stays the one copy people edit. Textual reads CSS from real paths,
# and setuptools never installs this package zipped, so the resource is a plain directory.
THEMES_DIR = Path(str(resources.files("rbee_tui") / "themes_data"))

RBEE_DARK = Theme(
    name="rbee-dark",
    primary="#F5B83D",
    secondary="#6CA0DC",
    accent="#F5B83D",
    warning="#F0A030",
    error="#E5534B",
    success="#57AB5A",
    foreground="#D8DEE4",
    background="#15171C",
    surface="#1E2128",
    panel="#262A33",
    dark=True,
)
RBEE_LIGHT = Theme(
    name="rbee-light",
    primary="#8A5A00",
    secondary="#1F5FA8",
    accent="#8A5A00",
    warning="#9A5B00",
    error="#B3261E",
    success="#1E6B2A",
    foreground="#111111",
    background="#FAFAF7",
    surface="#FFFFFF",
    panel="#ECEAE4",
    dark=False,
)
THEMES = (RBEE_DARK, RBEE_LIGHT)
THEME_NAMES = tuple(t.name for t in THEMES)


def stylesheets() -> list[Path]:
    """The shared layout, then one stylesheet per theme (each scoped to its own app class)."""
    return [THEMES_DIR / "rbee.tcss", *(THEMES_DIR / f"{name}.tcss" for name in THEME_NAMES)]
