"""`rbee-tui`: the dashboard, and headless subcommands for scripts."""

from __future__ import annotations

import argparse
import sys

from rbee_tui import __version__
from rbee_tui import config as cfgmod
from rbee_tui.errors import RbeeError

PROG = "rbee-tui"


def build_parser() -> argparse.ArgumentParser:
    """The `rbee-tui` command tree."""
    ap = argparse.ArgumentParser(prog=PROG, description="Dashboard for a home lab of LLM inference machines.")
    ap.add_argument("--config", help="config file (default: $RBEE_CONFIG or $XDG_CONFIG_HOME/rbee/config.toml)")
    ap.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    cfg = sub.add_parser("config", help="show or create the config file")
    cfg.add_argument("action", choices=["path", "show", "init"])
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rbee-tui`; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        cfg = cfgmod.load(args.config)
        if args.cmd == "config":
            if args.action == "path":
                print(cfg.path)
            elif args.action == "show":
                import tomli_w

                print(tomli_w.dumps(cfg.to_toml()), end="")
            else:
                if cfg.path and cfg.path.exists():
                    raise RbeeError(f"{cfg.path} already exists", "edit it, or remove it first")
                print(f"wrote {cfgmod.save(cfg, args.config)}")
            return 0
        from rbee_tui.app import RbeeApp

        RbeeApp(cfg).run()
        return 0
    except RbeeError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
