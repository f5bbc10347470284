"""Exactness of a build with llama.cpp's BLAS backend (the default on macOS, with Apple's
Accelerate; -DGGML_BLAS=ON elsewhere).

That backend takes matrix products of 32 rows and more, which several sequences' verify
rows reach; vendor patch 0024 leaves batches of up to 64 rows to the CPU backend's
batch-invariant kernels. Where OpenBLAS's headers are installed (.ci/run installs them),
this builds the library with OpenBLAS into build/blas and checks that eight sequences
decoded together equal each decoded alone; elsewhere it skips.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from source_build import build_blocker

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "blas"


def missing() -> str | None:
    blocker = build_blocker()
    if blocker is not None:
        return blocker
    if not any(Path(d, "cblas.h").exists() for d in ("/usr/include/x86_64-linux-gnu/openblas-pthread",
                                                      "/usr/include/aarch64-linux-gnu/openblas-pthread",
                                                      "/usr/include/openblas", "/usr/include")):
        return "no OpenBLAS headers (Debian/Ubuntu: apt-get install libopenblas-dev)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(missing() is not None, reason=missing() or "")
def test_eight_sequences_together_equal_each_alone_with_the_blas_backend():
    configure = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(BUILD), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                                "-DGGML_BLAS=ON", "-DGGML_BLAS_VENDOR=OpenBLAS"],
                               capture_output=True, text=True, timeout=600)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    build = subprocess.run(["cmake", "--build", str(BUILD), "--target", "pmtp"], capture_output=True, text=True,
                           timeout=3600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    lib = BUILD / "bin"
    assert (lib / "libggml-blas.so").exists(), "the build has no BLAS backend"
    shutil.copy(ROOT / "csrc" / "pmtp.h", lib / "pmtp.h")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short",
                          "test_exact_quantized.py", "-k", "eight_sequences and Q4_K_M-random"],
                         cwd=Path(__file__).parent, capture_output=True, text=True, timeout=3600,
                         env={**os.environ, "PYLLAMA_MTP_LIB_DIR": str(lib)})
    assert run.returncode == 0, f"with the BLAS backend:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert "1 passed" in run.stdout
