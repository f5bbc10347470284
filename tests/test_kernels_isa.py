"""The interleaved F32/F16/BF16 kernels (vendor patch 0017) compiled for instruction sets the
package's native build does not use on this machine: AVX2 without AVX-512 is what most
desktop and older server CPUs run. tests/native/interleaved_kernels.cpp is built from the
kernels' source in the patched tree and checks that every row of a product of 1 to 150 rows
(MUL_MAT and MUL_MAT_ID) has the bits it has alone and matches a float64 reference.
tests/native/quantized_kernels.cpp checks the quantized kernels (vendor patches 0014, 0018:
repacked Q4_0/Q4_K, plain Q8_0/Q5_K/Q6_K) against upstream's one-row kernels compiled for the
same instruction set. tests/native/quantize_q8_K.cpp checks the vectorised Q8_K activation
quantization (vendor patch 0027) against upstream's scalar reference, block by block.
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
CPU_SRC = GGML / "src" / "ggml-cpu"
NATIVE = Path(__file__).resolve().parent / "native"

ISAS = {
    "avx2": (["-mavx2", "-mf16c", "-mfma", "-mno-avx512f"], {"avx2", "f16c", "fma"}),
    "avx512": (["-mavx2", "-mf16c", "-mfma", "-mavx512f"], {"avx2", "f16c", "fma", "avx512f"}),
}
# the batch-invariant quantized kernels' AVX-512 path needs these too (else they build for AVX2)
AVX512_VNNI = (["-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"], {"avx512bw", "avx512vl", "avx512dq",
                                                                               "avx512_vnni"})


def build_and_run(isa: str, harness: str, sources: list[Path], libs: list[str], tmp_path: Path,
                  extra: tuple[list[str], set[str]] = ([], set())) -> None:
    flags, needs = ISAS[isa]
    flags, needs = flags + extra[0], needs | extra[1]
    if not needs <= cpu_flags():
        pytest.skip(f"this CPU cannot run {isa} code")
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    if not all(p.exists() for p in sources):
        pytest.skip("the patched llama.cpp tree is not here (an installed package without its source)")
    lib_dir = _native._lib_dir()
    includes = [f"-I{GGML / 'include'}", f"-I{GGML / 'src'}", f"-I{CPU_SRC}"]
    objects = []
    for c_source in (p for p in sources if p.suffix == ".c"):      # C sources: compiled as C
        c_compiler = shutil.which("gcc") or shutil.which("cc")
        if c_compiler is None:
            pytest.skip("no C compiler")
        obj = tmp_path / f"{c_source.stem}_{isa}.o"
        build = subprocess.run([c_compiler, "-O2", "-std=gnu11", *flags, *includes, "-c", str(c_source), "-o", str(obj)],
                               capture_output=True, text=True)
        assert build.returncode == 0, build.stderr[-3000:]
        objects.append(str(obj))
    exe = tmp_path / f"{Path(harness).stem}_{isa}"
    build = subprocess.run([compiler, "-O2", "-std=c++17", *flags, *includes, str(NATIVE / harness),
                            *[str(p) for p in sources if p.suffix != ".c"], *objects, f"-L{lib_dir}",
                            *[f"-l{lib}" for lib in libs], f"-Wl,-rpath,{lib_dir}", "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "PASSED" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


@pytest.mark.parametrize("isa", list(ISAS))
def test_interleaved_kernels_are_batch_invariant_and_right_for_each_instruction_set(isa, tmp_path):
    build_and_run(isa, "interleaved_kernels.cpp", [CPU_SRC / "interleaved-rows.cpp"], ["ggml-base"], tmp_path)


@pytest.mark.parametrize("isa", list(ISAS))
def test_quantized_kernels_give_every_row_the_one_row_kernel_s_bits_for_each_instruction_set(isa, tmp_path):
    # the package's own CPU backend repacks the weights and quantizes the activations; the
    # harness's kernels, gemv and vec_dot, built for this instruction set, take precedence
    # over the library's
    x86 = CPU_SRC / "arch" / "x86"
    build_and_run(isa, "quantized_kernels.cpp", [CPU_SRC / "batch-invariant.cpp", x86 / "repack.cpp", x86 / "quants.c"],
                  ["ggml-cpu", "ggml-base", "ggml"], tmp_path, AVX512_VNNI if isa == "avx512" else ([], set()))


@pytest.mark.parametrize("isa", list(ISAS))
def test_q8_K_quantization_gives_the_reference_s_bits_for_each_instruction_set(isa, tmp_path):
    # the activations of every K-quant matmul (vendor patch 0027): the harness's
    # quantize_row_q8_K, built for this instruction set, against libggml-base's scalar reference
    build_and_run(isa, "quantize_q8_K.cpp", [CPU_SRC / "arch" / "x86" / "quants.c"], ["ggml-cpu", "ggml-base"], tmp_path)
