#!/usr/bin/env bash
# Build upstream llama.cpp's own tools (llama-bench, llama-server) from the same pinned
# tree, without our patches (the reference: upstream's own batched kernels), for
# side-by-side benchmarks. Output: $UPSTREAM_BUILD/bin (default build/upstream); the
# benchmark scripts read the same variable. Extra arguments go to cmake. UPSTREAM_TARGETS
# names what to build (default "llama-bench llama-server"; tests/test_exactness_check.py
# builds "ggml-rpc-server", upstream's RPC worker).
#
# On a CPU with AMX the native build's AMX matmul crashes (SIGSEGV in
# ggml_backend_amx_mul_mat) on quantized weights once a batch has more than one row (the
# crash our patch 0003 avoids), so there compare quantized models against a build without
# AMX, e.g.:
#   UPSTREAM_BUILD=build/upstream-noamx bash scripts/build_upstream.sh -DGGML_NATIVE=OFF \
#       -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/fetch_llama_cpp.py --dest build/upstream-src --no-patches
launcher=()
if command -v ccache >/dev/null 2>&1; then
    launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
out="${UPSTREAM_BUILD:-build/upstream}"
cmake -S build/upstream-src -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=ON "${launcher[@]}" "$@"
read -r -a targets <<< "${UPSTREAM_TARGETS:-llama-bench llama-server}"
cmake --build "$out" --target "${targets[@]}"
