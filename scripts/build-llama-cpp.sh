#!/usr/bin/env bash
# Builds llama.cpp's own llama-server, rpc-server and llama-bench from the llama.cpp sources vendored in the
# llama-cpp-python source distribution (the same llama.cpp the embedded engine runs), into a cache outside
# the repository:  ${RBEE_LLAMA_CPP_CACHE:-~/.cache/rbee/llama.cpp}/<version>/bin
# Prints the bin directory on its last line. Builds once per version; later runs return at once.
#   bash scripts/build-llama-cpp.sh [VERSION]        (default: the installed llama-cpp-python's version)
#   CMAKE_ARGS="-DGGML_CUDA=ON" bash scripts/build-llama-cpp.sh   for a CUDA build
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
version=${1:-$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')}
flavour=$(echo "${CMAKE_ARGS:-cpu}" | md5sum | cut -c1-8)
cache=${RBEE_LLAMA_CPP_CACHE:-$HOME/.cache/rbee/llama.cpp}/$version-$flavour
bin=$cache/bin
if [ -x "$bin/llama-server" ] && [ -x "$bin/llama-bench" ] && [ -x "$bin/rpc-server" ]; then
  echo "$bin"
  exit 0
fi
command -v cmake >/dev/null 2>&1 || { echo "cmake is needed (apt-get install cmake)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetching the llama-cpp-python $version source distribution" >&2
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version" >&2
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
echo "building llama-server, rpc-server, llama-bench (several minutes on 2 cores)" >&2
# shellcheck disable=SC2086
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF ${CMAKE_ARGS:-} >&2
cmake --build "$work/build" --config Release -j "$(nproc)" --target llama-server rpc-server llama-bench >&2
mkdir -p "$bin.tmp"
cp "$work"/build/bin/llama-server "$work"/build/bin/rpc-server "$work"/build/bin/llama-bench "$bin.tmp/"
git -C "$src" rev-parse --short HEAD >"$bin.tmp/BUILD_COMMIT" 2>/dev/null || echo "$version" >"$bin.tmp/BUILD_COMMIT"
rm -rf "$bin" && mv "$bin.tmp" "$bin"
echo "$bin"
