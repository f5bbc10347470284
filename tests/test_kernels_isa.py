"""The interleaved F32/F16/BF16 kernels (vendor patch 0017) compiled for instruction sets the
package's native build does not use on this machine: AVX2 without AVX-512 is what most
desktop and older server CPUs run. tests/native/interleaved_kernels.cpp is built from the
kernels' source in the patched tree and checks that every row of a product of 1 to 150 rows
(MUL_MAT and MUL_MAT_ID) has the bits it has alone and matches a float64 reference.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cpu_features import cpu_flags
from pyllama_mtp import _native

ROOT = Path(__file__).resolve().parent.parent
GGML = ROOT / "vendor" / "llama.cpp" / "ggml"
KERNELS = GGML / "src" / "ggml-cpu" / "interleaved-rows.cpp"
HARNESS = Path(__file__).resolve().parent / "native" / "interleaved_kernels.cpp"

ISAS = {
    "avx2": (["-mavx2", "-mf16c", "-mfma", "-mno-avx512f"], {"avx2", "f16c", "fma"}),
    "avx512": (["-mavx2", "-mf16c", "-mfma", "-mavx512f"], {"avx2", "f16c", "fma", "avx512f"}),
}


@pytest.mark.parametrize("isa", list(ISAS))
def test_interleaved_kernels_are_batch_invariant_and_right_for_each_instruction_set(isa, tmp_path):
    flags, needs = ISAS[isa]
    if not needs <= cpu_flags():
        pytest.skip(f"this CPU cannot run {isa} code")
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    if not KERNELS.exists():
        pytest.skip("the patched llama.cpp tree is not here (an installed package without its source)")
    lib_dir = _native._lib_dir()
    exe = tmp_path / f"interleaved_{isa}"
    build = subprocess.run([compiler, "-O2", "-std=c++17", *flags, f"-I{GGML / 'include'}", f"-I{GGML / 'src'}",
                            f"-I{GGML / 'src' / 'ggml-cpu'}", str(HARNESS), str(KERNELS), f"-L{lib_dir}",
                            "-lggml-base", f"-Wl,-rpath,{lib_dir}", "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "PASSED" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
