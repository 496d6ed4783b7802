#!/usr/bin/env bash
# Installs everything the tests need, then lints and runs the whole suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
# llama.cpp's own llama-server for the engine tests: built once per version into ~/.cache/rbee, then reused.
RBEE_LLAMA_SERVER="$(bash scripts/build-llama-cpp.sh | tail -n 1)/llama-server"
export RBEE_LLAMA_SERVER
.venv/bin/ruff check rbee_tui tests fixtures bench
.venv/bin/ruff format --check rbee_tui tests fixtures bench
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
