#!/usr/bin/env bash
# Installs rbee-tui into ./.venv (created here if missing), editable, with what the system needs first.
#   bash scripts/install.sh          the tool
#   bash scripts/install.sh --test   the tool and its test tools, plus sshd and tmux for the end-to-end tests
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

# System packages: a compiler for llama-cpp-python, venv support, and for tests an OpenSSH server and tmux.
need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v git >/dev/null 2>&1 || need+=(git)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
if [ "$want_test" = 1 ]; then
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
  command -v tmux >/dev/null 2>&1 || need+=(tmux)
  command -v cmake >/dev/null 2>&1 || need+=(cmake)
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
# llama-cpp-python compiles llama.cpp on first install (a few minutes on 2 cores); pip caches the wheel after.
.venv/bin/python -m pip install -q -e ".${extra}"
echo "rbee-tui installed in .venv"
