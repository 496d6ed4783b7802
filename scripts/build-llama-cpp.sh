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
if [ -x "$bin/llama-server" ] && [ -x "$bin/llama-bench" ] && [ -f "$bin/BUILD_COMMIT" ]; then
  echo "$bin"
  exit 0
fi
command -v cmake >/dev/null 2>&1 || { echo "cmake is needed (apt-get install cmake)" >&2; exit 1; }
# Sources and the build tree stay in the cache too, so an interrupted build picks up where it stopped.
mkdir -p "$cache"
if [ ! -d "$cache/src" ]; then
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  echo "fetching the llama-cpp-python $version source distribution" >&2
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$dl" "llama-cpp-python==$version" >&2
  tar -xzf "$dl"/llama_cpp_python-*.tar.gz -C "$dl"
  mv "$dl"/llama_cpp_python-*/vendor/llama.cpp "$cache/src.tmp" && mv "$cache/src.tmp" "$cache/src"
fi
src=$cache/src
# The RPC server's target is ggml-rpc-server in newer llama.cpp, rpc-server in older.
rpc=$(sed -n 's/^set(TARGET \(.*rpc-server\))/\1/p' "$src/tools/rpc/CMakeLists.txt" 2>/dev/null || true)
rpc=${rpc:-rpc-server}
echo "building llama-server, $rpc, llama-bench (several minutes on 2 cores)" >&2
# shellcheck disable=SC2086
cmake -S "$src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF ${CMAKE_ARGS:-} >&2
cmake --build "$cache/build" --config Release -j "$(nproc)" --target llama-server "$rpc" llama-bench >&2
rm -rf "$bin.tmp" && mkdir -p "$bin.tmp"
cp "$cache/build/bin/llama-server" "$cache/build/bin/$rpc" "$cache/build/bin/llama-bench" "$bin.tmp/"
[ "$rpc" = rpc-server ] || ln -sf "$rpc" "$bin.tmp/rpc-server"
"$bin.tmp/llama-server" --version 2>&1 | sed -n 's/^version: *//p' | head -n1 >"$bin.tmp/BUILD_COMMIT"
rm -rf "$bin" && mv "$bin.tmp" "$bin"
echo "$bin"
