"""Python side of the kernel probes (pmtp_probe_mul_mat, pmtp_probe_flash_attn,
pmtp_probe_row_op): one op, set up as a model runs it, on the CPU or on a named device
("CUDA0"), for the batch-invariance tests of the CPU kernels and the GPU ones."""
from __future__ import annotations

import numpy as np

from pyllama_mtp import _native

# ggml type ids (ggml.h)
TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}
BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
F32, F16 = 0, 1   # ggml_type values the attention probe accepts for K/V


def _device_arg(device: str | None):
    return _native.ffi.new("char[]", device.encode()) if device else _native.ffi.NULL


def mul_mat(type_name: str, w: np.ndarray, x: np.ndarray, *, repack: bool = True, threads: int = 2,
            device: str | None = None):
    """(out [n, m], repacked) of w [m, k] converted to type_name times x [n, k]."""
    ffi, lib = _native.ffi, _native.lib
    w = np.ascontiguousarray(w, np.float32)
    x = np.ascontiguousarray(x, np.float32)
    m, k = w.shape
    out = np.empty((x.shape[0], m), np.float32)
    repacked = ffi.new("bool *")
    status = lib.pmtp_probe_mul_mat(TYPES[type_name], k, m, x.shape[0], ffi.cast("float *", w.ctypes.data),
                                    ffi.cast("float *", x.ctypes.data), repack, threads,
                                    ffi.cast("float *", out.ctypes.data), repacked, _device_arg(device))
    _native.check(status, "pmtp_probe_mul_mat")
    return out, bool(repacked[0])


def attend(q, k, v, mask, *, n_head_kv, n_threads, kv_type=F16, scale=None, device: str | None = None):
    """Flash attention of q [n_q, n_head, d_k] over k [n_kv, n_head_kv, d_k], v [n_kv, n_head_kv, d_v]."""
    n_q, n_head, d_k = q.shape
    n_kv, _, d_v = v.shape
    q, k, v = (np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v))
    out = np.empty((n_q, n_head, d_v), dtype=np.float32)
    ffi = _native.ffi
    fp = lambda a: ffi.cast("float *", a.ctypes.data)  # noqa: E731
    if mask is not None:
        mask = np.ascontiguousarray(mask, dtype=np.float32)
        assert mask.shape == (n_q, n_kv)
    scale = 1.0 / np.sqrt(d_k) if scale is None else scale
    status = _native.lib.pmtp_probe_flash_attn(
        kv_type, d_k, d_v, n_head, n_head_kv, n_kv, n_q, fp(q), fp(k), fp(v),
        fp(mask) if mask is not None else ffi.NULL, float(scale), n_threads, fp(out), _device_arg(device))
    _native.check(status, "pmtp_probe_flash_attn")
    return out


ROW_OPS = {"rms_norm": 0, "norm": 1, "l2_norm": 2, "soft_max": 3, "sum_rows": 4, "top_k": 5, "swiglu": 6,
           "rope_neox": 7}


def row_op(name: str, x: np.ndarray, *, threads: int, mask=None, pos=None, param: int = 0) -> np.ndarray:
    """One of the graph's per-token ops (pmtp_probe_row_op) on x [n, ne0], as [n, out_ne0]
    (top_k: int32 indices; the others float32)."""
    ffi = _native.ffi
    x = np.ascontiguousarray(x, np.float32)
    n, ne0 = x.shape
    out_ne0 = {"sum_rows": 1, "top_k": param, "swiglu": ne0 // 2}.get(name, ne0)
    out = np.empty((n, out_ne0), np.int32 if name == "top_k" else np.float32)
    if mask is not None:
        mask = np.ascontiguousarray(mask, np.float32)
        assert mask.shape == x.shape
    if pos is not None:
        pos = np.ascontiguousarray(pos, np.int32)
        assert pos.shape == (n,)
    ptr = lambda a, t: ffi.cast(t, a.ctypes.data) if a is not None else ffi.NULL  # noqa: E731
    status = _native.lib.pmtp_probe_row_op(ROW_OPS[name], ne0, n, ptr(x, "float *"), ptr(mask, "float *"),
                                           ptr(pos, "int32_t *"), param, threads, ptr(out, "float *"))
    _native.check(status, "pmtp_probe_row_op")
    return out


def rows_that_differ(batch: np.ndarray, alone: np.ndarray) -> list[int]:
    """Rows (axis 0) whose bits differ between a batched result and the rows computed alone."""
    return [i for i in range(batch.shape[0]) if not np.array_equal(batch[i].view(np.uint32), alone[i].view(np.uint32))]


def random_qkv(seed, n_q, n_head, n_head_kv, n_kv, d):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n_q, n_head, d), dtype=np.float32)
    # A spread of magnitudes so the running maximum moves often (rescaling the accumulator).
    k = rng.standard_normal((n_kv, n_head_kv, d), dtype=np.float32) * rng.uniform(0.2, 3.0, (n_kv, 1, 1)).astype(np.float32)
    v = rng.standard_normal((n_kv, n_head_kv, d), dtype=np.float32)
    return q, k, v


def verify_mask(n_q, n_kv):
    """A verify batch's causal mask: query i is token n_kv - n_q + i and sees positions <= itself."""
    pos = np.arange(n_kv)[None, :]
    last = (n_kv - n_q + np.arange(n_q))[:, None]
    return np.where(pos <= last, 0.0, -np.inf).astype(np.float32)


def batches_and_rows_alone(type_name: str, shapes, row_counts, rng, **probe):
    """For each (k, m) in shapes and n in row_counts: (k, m, n, the n-row product, the same n
    rows each multiplied alone), on random weights and activations of varied scale."""
    for k, m in shapes:
        w = rng.standard_normal((m, k)).astype(np.float32)
        x = (rng.standard_normal((max(row_counts), k)) * rng.uniform(0.1, 10)).astype(np.float32)
        alone = np.concatenate([mul_mat(type_name, w, x[i:i + 1], **probe)[0] for i in range(x.shape[0])])
        for n in row_counts:
            yield k, m, n, mul_mat(type_name, w, x[:n], **probe)[0], alone[:n]
