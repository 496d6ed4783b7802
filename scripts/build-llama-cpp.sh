#!/usr/bin/env bash
# Builds llama.cpp's own llama-server, ggml-rpc-server and llama-bench from the llama.cpp sources vendored in
# the llama-cpp-python source distribution (the same llama.cpp the embedded engine runs), into a cache outside
# the repository:  ${RBEE_LLAMA_CPP_CACHE:-~/.cache/rbee/llama.cpp}/<version>-<flavour>/bin
# Prints the bin directory on its last line. Builds once per version; later runs return at once.
#   bash scripts/build-llama-cpp.sh [VERSION]        (default: the installed llama-cpp-python's version)
#   CMAKE_ARGS="-DGGML_CUDA=ON" bash scripts/build-llama-cpp.sh   for a CUDA build
# The steps live in rbee_tui/hive/setup.py, which `rbee-hive setup` runs on a node too (docs/cluster.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m rbee_tui.hive.setup "$@"
