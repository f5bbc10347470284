"""Batch invariance of the graph's per-token ops other than matrix products and attention,
through pmtp_probe_row_op: the norms (RMSNorm of every block, the norm and L2 norm some
architectures use), softmax (attention without flash attention, the MoE router), the
router's top-k and weight sum, the FFN's SwiGLU gate and RoPE.

A verify batch is exact only if every op gives a row the bits it gets when the row is
decoded alone. The CPU backend splits these ops over threads by rows, so each row's
reduction runs whole on one thread in one order; these tests hold that for 1 to 64 rows
and 1 to 4 threads (a batch may run with another thread count than a one-token decode:
llama.cpp's threads_batch), against the row computed alone on one thread, and check each
op's values against numpy so that the probe is known to run the op it names.
"""
from __future__ import annotations

import numpy as np
import pytest

from kernel_probes import row_op
from pyllama_mtp import errors

ROW_COUNTS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 33, 64]
THREADS = [1, 2, 3, 4]
HEAD = 64          # rope: head size


def reference(name: str, x: np.ndarray, mask, pos, param) -> np.ndarray:
    """The op in float64 numpy."""
    x = x.astype(np.float64)
    if name == "rms_norm":
        return x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + 1e-6)
    if name == "norm":
        c = x - x.mean(axis=1, keepdims=True)
        return c / np.sqrt(np.mean(c * c, axis=1, keepdims=True) + 1e-5)
    if name == "l2_norm":
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
    if name == "soft_max":
        z = x * 0.125 + (mask if mask is not None else 0.0)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if name == "sum_rows":
        return x.sum(axis=1, keepdims=True)
    if name == "top_k":
        return np.argsort(-x, axis=1, kind="stable")[:, :param]
    if name == "swiglu":
        g, v = np.split(x, 2, axis=1)
        return g / (1.0 + np.exp(-g)) * v
    if name == "rope_neox":
        n = x.shape[0]
        h = x.reshape(n, -1, param)
        half = param // 2
        theta = pos[:, None].astype(np.float64) * 10000.0 ** (-2.0 * np.arange(half) / param)[None, :]
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        a, b = h[..., :half], h[..., half:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(n, -1)
    raise AssertionError(name)


def case(name: str, ne0: int, seed: int):
    """Random rows of varied scale and, per op, the mask / positions / k a model gives it."""
    rng = np.random.default_rng(seed)
    n = max(ROW_COUNTS)
    x = (rng.standard_normal((n, ne0)) * rng.uniform(0.01, 30.0, (n, 1))).astype(np.float32)
    mask = pos = None
    param = 0
    if name == "soft_max":      # a verify batch's causal mask: row i sees the first ne0 - n + i columns
        cols = np.arange(ne0)[None, :]
        last = np.maximum(ne0 - n + np.arange(n), 0)[:, None]
        mask = np.where(cols <= last, 0.0, -np.inf).astype(np.float32)
    if name == "top_k":
        param = min(8, ne0)
    if name == "rope_neox":
        param = HEAD
        pos = (rng.integers(0, 4096) + np.arange(n)).astype(np.int32)
    return x, mask, pos, param


OPS = {   # op -> row sizes (odd ones leave a remainder after the SIMD loops)
    "rms_norm": [1, 7, 100, 2048, 4099],
    "norm": [7, 100, 4099],
    "l2_norm": [7, 128, 4099],
    "soft_max": [70, 300, 2100],
    "sum_rows": [7, 100, 4099],
    "top_k": [8, 64, 288],
    "swiglu": [14, 200, 8194],
    "rope_neox": [HEAD, 4 * HEAD, 32 * HEAD],
}


@pytest.mark.parametrize("name,ne0", [(name, ne0) for name, sizes in OPS.items() for ne0 in sizes])
def test_every_row_of_a_batch_has_the_bits_of_the_row_alone(name, ne0):
    x, mask, pos, param = case(name, ne0, seed=ne0 * 31 + len(name))

    def run(rows: slice, threads: int) -> np.ndarray:
        return row_op(name, x[rows], threads=threads, mask=None if mask is None else mask[rows],
                      pos=None if pos is None else pos[rows], param=param)

    alone = np.concatenate([run(slice(i, i + 1), 1) for i in range(x.shape[0])])
    want = reference(name, x, mask, pos, param)
    if name == "top_k":
        np.testing.assert_array_equal(alone, want)
    else:
        atol = 1e-5 * float(np.abs(want).max())
        if name == "rope_neox":    # ggml steps each angle up in float32: off by ~1e-7 x position
            atol *= 1 + float(pos.max())
        np.testing.assert_allclose(alone, want, rtol=2e-4, atol=atol)
    for threads in THREADS:
        for n in ROW_COUNTS:
            batch = run(slice(0, n), threads)
            differ = [i for i in range(n) if batch[i].tobytes() != alone[i].tobytes()]
            assert not differ, (f"{name}, {ne0} wide: rows {differ} of a {n}-row batch on {threads} threads "
                                f"differ from the row alone")


def test_bad_shapes_are_refused():
    x = np.ones((2, 6), np.float32)
    with pytest.raises(errors.InvalidArgumentError, match="top-k"):
        row_op("top_k", x, threads=1, param=7)
    with pytest.raises(errors.InvalidArgumentError, match="even head size"):
        row_op("rope_neox", x, threads=1, pos=np.zeros(2, np.int32), param=4)
    with pytest.raises(errors.InvalidArgumentError, match="only soft_max"):
        row_op("rms_norm", x, threads=1, mask=np.zeros_like(x))
