#!/usr/bin/env bash
# Installs rbee-tui into ./.venv (created here if missing), editable, with what the system needs first, then
# builds llama.cpp once for this machine (llama-server, ggml-rpc-server, llama-bench and the libllama the
# embedded engine loads: scripts/build-llama-cpp.sh, kept in ~/.cache/rbee/llama.cpp).
#   bash scripts/install.sh          the tool
#   bash scripts/install.sh --test   the tool and its test tools, plus sshd and tmux for the end-to-end tests
#   CMAKE_ARGS="-DGGML_CUDA=ON" bash scripts/install.sh    a CUDA build of llama.cpp
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

# System packages: a compiler and cmake for llama.cpp, venv support, and for tests an OpenSSH server and tmux.
need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v git >/dev/null 2>&1 || need+=(git)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
if [ "$want_test" = 1 ]; then
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
  command -v tmux >/dev/null 2>&1 || need+=(tmux)
  command -v chromium >/dev/null 2>&1 || need+=(chromium)  # draws the HTML export's charts in a test
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing system packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "please install: ${need[*]}" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "rbee-tui needs Python 3.11 or newer" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extra=""
[ "$want_test" = 1 ] && extra="[test]"
# llama.cpp is compiled once, below: llama-cpp-python installs without its own copy (LLAMA_BUILD=OFF) and
# loads the build's libllama (rbee_tui/llama_build.py). No pip cache here: a library-less llama-cpp-python
# wheel must not be reused by a later plain `pip install` elsewhere, which expects one that carries its library.
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" .venv/bin/python -m pip install -q --no-cache-dir -e ".${extra}"
echo "rbee-tui installed in .venv; building llama.cpp (once per version: minutes on a small machine)"
PYTHON=.venv/bin/python bash scripts/build-llama-cpp.sh >/dev/null
echo "rbee-tui is ready: .venv/bin/rbee-tui"
