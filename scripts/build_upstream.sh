#!/usr/bin/env bash
# Build upstream llama.cpp's own tools (llama-bench, llama-server) from the same pinned
# tree, without our patches (the reference: upstream's own batched kernels), for
# side-by-side benchmarks. Output: build/upstream/bin. Extra arguments go to cmake.
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/fetch_llama_cpp.py --dest build/upstream-src --no-patches
launcher=()
if command -v ccache >/dev/null 2>&1; then
    launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
cmake -S build/upstream-src -B build/upstream -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=ON "${launcher[@]}" "$@"
cmake --build build/upstream --target llama-bench llama-server
