"""Batch invariance of the CPU matrix products: a row's outputs have the same bits whether it
is multiplied alone (a one-token decode) or as one of n rows (a speculative verify batch, or
several sequences' rows), for every weight type users meet on a CPU, plain and repacked.

The products run through pmtp_probe_mul_mat, which sets the weight up as the model loader
does (same conversion, the CPU's repacking buffer), so they take the kernels decoding takes.
"""
from __future__ import annotations

import numpy as np
import pytest

from cpu_features import cpu_flags
from kernel_probes import BLOCK, TYPES, batches_and_rows_alone, mul_mat, rows_that_differ
from pyllama_mtp import _native, errors
from pyllama_mtp.engine import build_info

ROW_COUNTS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 33, 64]


def shapes(type_name: str):
    """(k, m) pairs: k a multiple of the block size but not always of 256 or of the SIMD step
    (leftover paths), m a multiple of 8 (repacked layouts) and not (plain layout)."""
    b = BLOCK[type_name]
    if b == 256:
        return [(256, 24), (768, 40), (1280, 20)]
    if b == 32:
        return [(32, 16), (96, 24), (544, 40), (1056, 20)]
    return [(64, 16), (200, 24), (517, 20), (1000, 40)]


@pytest.mark.parametrize("type_name", list(TYPES))
@pytest.mark.parametrize("repack", [True, False], ids=["repacked-if-any", "plain"])
def test_matmul_rows_equal_one_row_products_bit_for_bit(type_name, repack):
    rng = np.random.default_rng(TYPES[type_name] * 7 + repack)
    for k, m, n, batch, alone in batches_and_rows_alone(type_name, shapes(type_name), ROW_COUNTS, rng, repack=repack):
        assert rows_that_differ(batch, alone) == [], f"{type_name} k={k} m={m}: n={n} rows differ from alone"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matmul_rows_do_not_depend_on_thread_count(threads):
    rng = np.random.default_rng(threads)
    for type_name in ("Q4_K", "Q6_K", "Q8_0", "F16"):
        k, m = (512, 40) if BLOCK[type_name] == 256 else (320, 40)
        w = rng.standard_normal((m, k)).astype(np.float32)
        x = rng.standard_normal((9, k)).astype(np.float32)
        one_thread, _ = mul_mat(type_name, w, x, threads=1)
        batch, _ = mul_mat(type_name, w, x, threads=threads)
        assert rows_that_differ(batch, one_thread) == [], type_name


# ||product - float64 product|| / ||float64 product|| for standard normal weights and
# activations: about half of each bound is the type's own rounding (measured: Q4_0 0.08-0.10,
# Q4_K 0.07-0.09, Q5_K 0.03-0.04, Q6_K 0.02, Q8_0 0.007), so a kernel that reads the layout
# wrongly (nibble order, offsets, scales) fails while rounding never does.
QUANTIZED_ERROR_BOUND = {"Q4_0": 0.2, "Q4_K": 0.18, "Q5_K": 0.08, "Q6_K": 0.05, "Q8_0": 0.015}


@pytest.mark.parametrize("type_name", list(QUANTIZED_ERROR_BOUND))
def test_quantized_products_are_close_to_a_float64_product(type_name):
    # Bit identity across batch sizes cannot see a kernel that is wrong the same way for one
    # row and many (the repacked Q4_0 kernel also runs one-token decodes): this can.
    rng = np.random.default_rng(TYPES[type_name])
    k, m = 512, 48
    w = rng.standard_normal((m, k)).astype(np.float32)
    x = rng.standard_normal((64, k)).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    for n in (1, 4, 64):
        out, _ = mul_mat(type_name, w, x[:n])
        err = np.linalg.norm(out - ref[:n]) / np.linalg.norm(ref[:n])
        assert err < QUANTIZED_ERROR_BOUND[type_name], f"{type_name} n={n}: relative error {err:.3f}"


def test_repacked_layouts_are_exercised_where_the_cpu_has_them():
    # On x86 with AVX2 the CPU backend repacks Q4_0 and Q4_K; the test above then covers the
    # repacked kernels. Elsewhere there may be none, which is fine: say so instead of failing.
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    repacked = {t: mul_mat(t, w, x)[1] for t in ("Q4_0", "Q4_K")}
    if not any(repacked.values()):
        pytest.skip("this CPU has no repacked layout for Q4_0/Q4_K")
    assert all(not mul_mat(t, w, x, repack=False)[1] for t in repacked)


FLOAT_TYPES = ("F32", "F16", "BF16")


def rounded(type_name: str, a: np.ndarray) -> np.ndarray:
    """a as the type stores it (and as the type's kernels round activations), in float64."""
    a = np.asarray(a, np.float32)
    if type_name == "F16":
        return a.astype(np.float16).astype(np.float64)
    if type_name == "BF16":  # round to nearest even on the upper 16 bits
        u = a.view(np.uint32).astype(np.uint64)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32)
        return u.view(np.float32).astype(np.float64)
    return a.astype(np.float64)


@pytest.mark.parametrize("type_name", FLOAT_TYPES)
def test_float_weights_take_the_interleaved_layout_on_x86_with_avx2(type_name):
    # Weights with rows in multiples of 4 and a row length that is a multiple of the SIMD
    # width (8 floats with AVX2, 16 with AVX-512) go to the interleaved layout, whose kernels
    # share work across rows; 196 is a multiple of neither.
    if not {"avx2", "f16c", "fma"} <= cpu_flags():
        pytest.skip("the interleaved layout needs x86 with AVX2, F16C and FMA")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    assert mul_mat(type_name, rng.standard_normal((16, 64)).astype(np.float32), x)[1]
    assert not mul_mat(type_name, rng.standard_normal((18, 64)).astype(np.float32), x)[1]    # rows % 4
    assert not mul_mat(type_name, rng.standard_normal((16, 196)).astype(np.float32), x[:, :1].repeat(196, 1))[1]
    assert not mul_mat(type_name, rng.standard_normal((16, 64)).astype(np.float32), x, repack=False)[1]


@pytest.mark.parametrize("type_name", FLOAT_TYPES)
@pytest.mark.parametrize("k, m", [(64, 4), (2048, 24), (1024, 36)])
def test_float_products_match_a_float64_reference_at_every_batch_size(type_name, k, m):
    # One row, a verify batch, a block of 64 and a prompt batch of several blocks: all must
    # be right (inputs rounded to the type, summed in float32; in float16 where upstream's
    # F16 kernels sum in half precision, ARM with FP16 vector arithmetic), and every row must
    # have the bits it has alone (prompt batches included, where the interleaved layout is used).
    rng = np.random.default_rng(k + m)
    w = rng.standard_normal((m, k)).astype(np.float32)
    x = rng.standard_normal((150, k)).astype(np.float32)
    ref = rounded(type_name, x) @ rounded(type_name, w).T
    eps = 1e-3 if type_name == "F16" and "FP16_VA = 1" in build_info()["system_info"] else 1e-5
    alone = np.concatenate([mul_mat(type_name, w, x[i:i + 1])[0] for i in range(x.shape[0])])
    for n in (1, 4, 64, 65, 150):
        out, repacked = mul_mat(type_name, w, x[:n])
        np.testing.assert_allclose(out, ref[:n], rtol=0, atol=eps * np.sqrt(k) * np.abs(ref).max())
        if repacked or n <= 64:
            assert rows_that_differ(out, alone[:n]) == [], f"{type_name} k={k} m={m} n={n}"


def test_probe_rejects_bad_arguments_with_an_error():
    ffi, lib = _native.ffi, _native.lib
    w = np.zeros((8, 100), np.float32)
    out = np.zeros((1, 8), np.float32)
    status = lib.pmtp_probe_mul_mat(TYPES["Q4_K"], 100, 8, 1, ffi.cast("float *", w.ctypes.data),
                                    ffi.cast("float *", w.ctypes.data), True, 1,
                                    ffi.cast("float *", out.ctypes.data), ffi.NULL, ffi.NULL)
    assert status != 0
    assert "block size" in ffi.string(lib.pmtp_last_error()).decode()


def test_probe_names_the_devices_when_the_device_is_unknown():
    w = np.zeros((8, 64), np.float32)
    with pytest.raises(errors.InvalidArgumentError, match=r"no device named 'NoSuchGPU0'.*devices: .*CPU"):
        mul_mat("F32", w, w[:1], device="NoSuchGPU0")
