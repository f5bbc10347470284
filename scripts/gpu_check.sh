#!/usr/bin/env bash
# GPU checks of a CUDA build (CMAKE_ARGS="-DGGML_CUDA=on" pip install .), run on a machine with
# an NVIDIA GPU: the opt-in exactness tests (tests/test_gpu.py), then a draft sweep of the
# built-in 1 GB oracle as F16 and Q4_K_M at depth 0 and 2,048, with the batch-invariant kernel
# choices on (patch 0019) and off (GGML_CUDA_BATCH_INVARIANT=0: upstream's, inexact), to see
# what exactness costs. Results go to stdout; OUT=dir also keeps the logs there.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
cd "$out"    # the installed package, not the source tree's (which has no compiled library)
python -c "from pyllama_mtp.engine import build_info; d = [x['name'] for x in build_info()['devices']]; \
assert any(n.startswith('CUDA') for n in d), f'no CUDA device in this build: {d}'" || exit 1
(cd "$root/tests" && python -m pytest -q -p no:cacheprovider -m gpu -rfE --tb=short test_gpu.py) 2>&1 | tee "$out/tests_gpu.log" | tail -20
f16=$(python -c "from pyllama_mtp.bench import builtin; print(builtin.resolve('tiny:step35-1g'))")
q4="$out/tiny-step35-1g-q4_k_m.gguf"
python -c "from pyllama_mtp.tools.quantize import quantize; quantize('$f16', '$q4', 'Q4_K_M')" >/dev/null
for m in "$f16" "$q4"; do
    python -m pyllama_mtp.bench.cli -m "$m" -ngl 99 --draft 0,1,2,3,auto -n 128 -d 0,2048 -r 3 -o md --no-progress \
        2>&1 | tee -a "$out/bench.md"
    GGML_CUDA_BATCH_INVARIANT=0 python -m pyllama_mtp.bench.cli -m "$m" -ngl 99 --draft 0,3 -n 128 -d 0,2048 -r 3 -o md \
        --no-progress 2>&1 | tee -a "$out/bench_upstream_kernels.md"
done
echo "logs in $out"
