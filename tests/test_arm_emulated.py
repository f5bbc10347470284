"""The batch-invariance tests on 64-bit ARM, where this x86-64 machine can emulate it.

ARM CPUs take other kernels than x86 (NEON, dotprod, fp16 arithmetic, and with i8mm two-row
int8 kernels that sum in another order than the one-row ones: vendor patch 0023). Where
``scripts/arm_check.sh setup`` has put a cross compiler, qemu-aarch64 and an arm64 Python
here (.ci/run does), this builds the library for aarch64 with i8mm and runs the kernel tests
under user emulation, which computes what an ARM CPU computes, bit for bit. Elsewhere it
skips.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pytest

from source_build import build_blocker

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "arm_check.sh"
SYSROOT = Path(os.environ.get("ARM_SYSROOT", ROOT / "build" / "arm64-sysroot"))


def missing() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "emulates ARM on an x86-64 host"
    blocker = build_blocker(("aarch64-linux-gnu-g++", "qemu-aarch64-static", "cmake", "ninja"),
                            hint="bash scripts/arm_check.sh setup installs what it needs")
    if blocker is not None:
        return blocker
    if not (SYSROOT / "usr" / "bin" / "python3").exists():
        return f"no arm64 Python in {SYSROOT} (bash scripts/arm_check.sh setup)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(missing() is not None, reason=missing() or "")
def test_kernels_on_emulated_arm_with_i8mm_equal_one_row_results_bit_for_bit():
    build = subprocess.run(["bash", str(SCRIPT), "build"], capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, f"the aarch64 build failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    run = subprocess.run(["bash", str(SCRIPT), "test", "test_kernels_matmul.py", "test_kernels_attention.py",
                          "test_kernels_rows.py", "-x", "--tb=short"],
                         capture_output=True, text=True, timeout=3600, env={**os.environ, "QEMU_CPU": "max"})
    assert run.returncode == 0, f"kernel tests under qemu-aarch64:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert " passed" in run.stdout
