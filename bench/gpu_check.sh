#!/usr/bin/env bash
# The CUDA path on a GPU machine with no network: build a CUDA llama-cpp-python from a carried source
# distribution, then run the GPU tests and a CPU-vs-CUDA decode comparison through rbee-worker.
# Needs, in .whl/: llama_cpp_python-*.tar.gz (sources), and wheels of gguf, tomli-w, diskcache.
set -euo pipefail
cd "$(dirname "$0")/.."
site=/tmp/site
mkdir -p "$site"
python3 -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
if ! PYTHONPATH=$site python3 -c 'import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())' 2>/dev/null; then
  src=$(mktemp -d)
  tar -xzf .whl/llama_cpp_python-*.tar.gz -C "$src"
  t0=$(date +%s)
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native -DGGML_CUDA_FA=OFF -DLLAMA_CURL=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" "$src"/llama_cpp_python-*
  echo "built llama-cpp-python with CUDA in $(( $(date +%s) - t0 ))s"
fi
export PYTHONPATH=$site:$PWD
mkdir -p /tmp/bin
printf '#!/bin/sh\nexec python3 -m rbee_tui.hive.cli "$@"\n' >/tmp/bin/rbee-hive
chmod +x /tmp/bin/rbee-hive
export PATH=/tmp/bin:$PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider -o addopts= -W ignore tests/e2e/test_gpu.py "$@"
