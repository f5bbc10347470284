#!/usr/bin/env bash
# GPU checks of a CUDA build (CMAKE_ARGS="-DGGML_CUDA=on" pip install .), run on a machine with
# an NVIDIA GPU, every layer on the GPU. Parts (GPU_CHECK_PARTS, default all three):
#   tests    the opt-in exactness tests (tests/test_gpu.py)
#   auto     draft="auto" against plain decoding and each fixed draft (scripts/bench_auto.py):
#            the built-in tiny models (acceptance 0.9, 0 and 0.6) and the 1 GB oracle as F16
#            and Q4_K_M, 64 and 192 tokens (1,024 on the 1 GB ones) at depth 0 and 2,048
#   kernels  a draft sweep of the 1 GB oracle with the batch-invariant kernel choices on
#            (patch 0019) and off (GGML_CUDA_BATCH_INVARIANT=0: upstream's, inexact), to see
#            what exactness costs
# Results go to stdout; OUT=dir also keeps the logs there. Each part is cut off after
# GPU_CHECK_PART_S seconds (default 600), so a short lease still returns what finished.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
parts="${GPU_CHECK_PARTS:-tests auto kernels}"
limit="${GPU_CHECK_PART_S:-600}"
py="${PYTHON:-python}"
cd "$out"    # the installed package, not the source tree's (which has no compiled library)
"$py" -c "from pyllama_mtp.engine import build_info; d = [x['name'] for x in build_info()['devices']]; \
assert any(n.startswith('CUDA') for n in d), f'no CUDA device in this build: {d}'" || exit 1

# the built-in 1 GB oracle (F16) and its Q4_K_M, written when a part first needs them
f16="" q4="$out/tiny-step35-1g-q4_k_m.gguf"
one_gb_models() {
    [ -n "$f16" ] || f16=$("$py" -c "from pyllama_mtp.bench import builtin; print(builtin.resolve('tiny:step35-1g'))")
    [ -f "$q4" ] || "$py" -c "from pyllama_mtp.tools.quantize import quantize; quantize('$f16', '$q4', 'Q4_K_M')" >/dev/null
}

for part in $parts; do
    echo "== $part ($(date -u +%T))"
    case "$part" in
    tests)
        (cd "$root/tests" && timeout "$limit" "$py" -m pytest -q -p no:cacheprovider -m gpu -rfE --tb=short \
            --durations=5 test_gpu.py) 2>&1 | tee "$out/tests_gpu.log" | tail -25 ;;
    auto)
        one_gb_models
        (timeout "$limit" bash -c "
            '$py' '$root/scripts/bench_auto.py' -m tiny:step35 -m tiny:step35-random -m tiny:step35-a0.6 \
                -n 64,192 -d 0,2048 -t 4 --rounds 5 --json '$out/auto_tiny.json'
            '$py' '$root/scripts/bench_auto.py' -m '$f16' -m '$q4' -n 64,192,1024 -d 0,2048 -t 4 --rounds 3 \
                --json '$out/auto_1g.json'") 2>&1 | tee "$out/auto.md" ;;
    kernels)
        one_gb_models
        for m in "$f16" "$q4"; do
            timeout "$limit" "$py" -m pyllama_mtp.bench.cli -m "$m" -ngl 99 --draft 0,1,2,3,auto -n 128 -d 0,2048 -r 3 \
                -o md --no-progress 2>&1 | tee -a "$out/bench.md"
            GGML_CUDA_BATCH_INVARIANT=0 timeout "$limit" "$py" -m pyllama_mtp.bench.cli -m "$m" -ngl 99 --draft 0,3 \
                -n 128 -d 0,2048 -r 3 -o md --no-progress 2>&1 | tee -a "$out/bench_upstream_kernels.md"
        done ;;
    *) echo "unknown part $part (tests, auto, kernels)"; exit 2 ;;
    esac
done
echo "logs in $out"
