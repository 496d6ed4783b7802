#!/usr/bin/env bash
# Installs everything the tests need, then lints and runs the whole suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
.venv/bin/ruff check rbee_tui tests fixtures bench
.venv/bin/ruff format --check rbee_tui tests fixtures bench
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
