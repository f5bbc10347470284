"""Batch invariance of the CPU flash attention, through pmtp_probe_flash_attn.

Speculative decoding is lossless only if a token's attention output has the same bits
whether the token is decoded alone or as one row of a verify batch. These tests run the
op the way a model runs it (permuted q, K/V views of a cache, F16 mask, F32 accumulation)
and compare each query of an n-query call with the same query computed alone, bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest

from kernel_probes import F16, F32, attend, random_qkv, verify_mask
from pyllama_mtp import _native, errors

N_HEAD_KV = 2     # two KV heads: runs of rows sharing a KV head end and restart mid-chunk


def gappy_mask(seed, n_q, n_kv):
    """Runs of -inf inside the visible range (other sequences' cells, a sliding window's
    holes), different for every query, and one query that sees nothing at all."""
    rng = np.random.default_rng(seed)
    mask = verify_mask(n_q, n_kv)
    for i in range(n_q):
        for _ in range(rng.integers(1, 6)):
            start = rng.integers(0, n_kv)
            mask[i, start:start + rng.integers(1, max(2, n_kv // 4))] = -np.inf
        if rng.random() < 0.5:
            mask[i, 0] = 0.0   # the first visible cell is sometimes a masked run's neighbour
    if n_q > 2:
        mask[n_q // 2, :] = -np.inf
    return mask


def assert_rows_match_alone(q, k, v, mask, *, n_head_kv, n_threads, kv_type=F16):
    batch = attend(q, k, v, mask, n_head_kv=n_head_kv, n_threads=n_threads, kv_type=kv_type)
    for i in range(q.shape[0]):
        alone = attend(q[i:i + 1], k, v, mask[i:i + 1], n_head_kv=n_head_kv, n_threads=n_threads, kv_type=kv_type)
        a, b = batch[i].view(np.uint32), alone[0].view(np.uint32)
        if not np.array_equal(a, b):
            head, col = np.argwhere(a != b)[0]
            pytest.fail(f"query {i} of {q.shape[0]} differs from its one-query result "
                        f"(n_kv={k.shape[0]}, heads={q.shape[1]}/{n_head_kv}, threads={n_threads}): "
                        f"head {head} dim {col}: {batch[i, head, col]!r} vs {alone[0, head, col]!r}")
    return batch


N_Q = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16]


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("n_kv", [1, 7, 300, 2100])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_verify_batch_rows_equal_single_query_decodes(d, gqa, n_kv, n_threads):
    for n_q in N_Q:
        if n_q > n_kv:
            continue   # a verify batch's queries are themselves in the KV range
        q, k, v = random_qkv(1000 * n_q + n_kv + d + gqa, n_q, N_HEAD_KV * gqa, N_HEAD_KV, n_kv, d)
        assert_rows_match_alone(q, k, v, verify_mask(n_q, n_kv), n_head_kv=N_HEAD_KV, n_threads=n_threads)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("n_kv", [7, 300, 2100])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_masked_runs_and_fully_masked_rows_equal_single_query_decodes(d, gqa, n_kv, n_threads):
    for n_q in N_Q:
        q, k, v = random_qkv(7 + 1000 * n_q + n_kv + d + gqa, n_q, N_HEAD_KV * gqa, N_HEAD_KV, n_kv, d)
        mask = gappy_mask(n_q * 31 + n_kv, n_q, n_kv)
        out = assert_rows_match_alone(q, k, v, mask, n_head_kv=N_HEAD_KV, n_threads=n_threads)
        for i in np.flatnonzero(np.all(mask == -np.inf, axis=1)):
            assert not out[i].any(), "a query that sees no position attends to nothing (zeros)"


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("n_kv", [7, 2100])
def test_f32_kv_rows_equal_single_query_decodes(n_kv, n_threads):
    """The F32 K/V branch of the kernel (an un-cached K/V) keeps the same guarantee."""
    for n_q in (1, 3, 9, 16):
        q, k, v = random_qkv(n_q + n_kv, n_q, 8, N_HEAD_KV, n_kv, 64)
        assert_rows_match_alone(q, k, v, verify_mask(n_q, n_kv), n_head_kv=N_HEAD_KV, n_threads=n_threads, kv_type=F32)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_rows_without_a_mask_equal_single_query_decodes(n_threads):
    """No mask at all (every query sees every position): the kernel's mask-free branch."""
    n_q, n_kv = 6, 700
    q, k, v = random_qkv(21, n_q, 8, N_HEAD_KV, n_kv, 128)
    batch = attend(q, k, v, None, n_head_kv=N_HEAD_KV, n_threads=n_threads)
    for i in range(n_q):
        alone = attend(q[i:i + 1], k, v, None, n_head_kv=N_HEAD_KV, n_threads=n_threads)
        assert np.array_equal(batch[i].view(np.uint32), alone[0].view(np.uint32)), f"query {i}"


def test_long_gqa_groups_over_many_heads_equal_single_query_decodes():
    """32 query heads on 8 KV heads and 16 queries: 64 rows share a KV head, more than one
    pass of the kernel takes, so a group is split into several passes."""
    n_q, n_kv, d = 16, 600, 64
    q, k, v = random_qkv(5, n_q, 32, 8, n_kv, d)
    for n_threads in (1, 2):
        assert_rows_match_alone(q, k, v, verify_mask(n_q, n_kv), n_head_kv=8, n_threads=n_threads)


@pytest.mark.parametrize("d_k, d_v", [(192, 128), (70, 38)])
def test_different_head_dims_for_k_and_v_equal_single_query_decodes(d_k, d_v):
    """(70, 38): sizes that leave a scalar tail after every SIMD width's vectors."""
    rng = np.random.default_rng(11)
    n_q, n_kv, n_head = 5, 300, 8
    q = rng.standard_normal((n_q, n_head, d_k), dtype=np.float32)
    k = rng.standard_normal((n_kv, N_HEAD_KV, d_k), dtype=np.float32)
    v = rng.standard_normal((n_kv, N_HEAD_KV, d_v), dtype=np.float32)
    assert_rows_match_alone(q, k, v, verify_mask(n_q, n_kv), n_head_kv=N_HEAD_KV, n_threads=2)


def test_result_does_not_depend_on_thread_count():
    n_q, n_kv = 4, 2100
    q, k, v = random_qkv(3, n_q, 32, 8, n_kv, 128)
    mask = verify_mask(n_q, n_kv)
    one = attend(q, k, v, mask, n_head_kv=8, n_threads=1)
    two = attend(q, k, v, mask, n_head_kv=8, n_threads=2)
    assert np.array_equal(one.view(np.uint32), two.view(np.uint32))


@pytest.mark.parametrize("d, n_kv", [(64, 50), (64, 2100), (128, 2100), (256, 700), (70, 300)])
def test_probe_matches_a_float64_softmax_attention(d, n_kv):
    """The probe computes attention at all (it is not just self-consistent), and in F32: Q
    as given, K/V as the F16 cache holds them, an F32 accumulator. Against a float64
    reference on those operands the error stays near F32 rounding over thousands of
    positions (about 2e-6 here); an F16 accumulator or Q rounded to F16 (upstream's F16
    path) leaves 4e-3 to 7e-3."""
    n_q, n_head = 3, 4
    q, k, v = random_qkv(9, n_q, n_head, N_HEAD_KV, n_kv, d)
    mask = verify_mask(n_q, n_kv)
    out = attend(q, k, v, mask, n_head_kv=N_HEAD_KV, n_threads=1)
    kh = k.astype(np.float16).astype(np.float64)
    vh = v.astype(np.float16).astype(np.float64)
    qd = q.astype(np.float64)
    for h in range(n_head):
        g = h // (n_head // N_HEAD_KV)
        logits = qd[:, h] @ kh[:, g].T / np.sqrt(d) + mask
        w = np.exp(logits - logits.max(axis=1, keepdims=True))
        ref = (w / w.sum(axis=1, keepdims=True)) @ vh[:, g]
        np.testing.assert_allclose(out[:, h], ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("change, words", [
    (dict(n_head=6, n_head_kv=4), "multiple of n_head_kv"),
    (dict(kv_type=8), "kv_type"),
    (dict(n_q=0), "n_q"),
    (dict(d_k=-1), "d_k"),
    (dict(n_threads=-2), "n_threads"),
    (dict(q=None), "q is NULL"),
    (dict(out=None), "out is NULL"),
    (dict(device=b"NoSuchGPU0"), "no device named 'NoSuchGPU0'"),
])
def test_bad_probe_arguments_raise_invalid_argument(change, words):
    ffi = _native.ffi
    buf = np.zeros(1 << 16, dtype=np.float32)
    p = ffi.cast("float *", buf.ctypes.data)
    args = dict(kv_type=F16, d_k=8, d_v=8, n_head=4, n_head_kv=2, n_kv=4, n_q=2, q=p, k=p, v=p, mask=ffi.NULL,
                scale=1.0, n_threads=1, out=p, device=ffi.NULL)
    args.update({key: (ffi.NULL if val is None else val) for key, val in change.items()})
    status = _native.lib.pmtp_probe_flash_attn(*args.values())
    with pytest.raises(errors.InvalidArgumentError, match=words):
        _native.check(status)


def shared_stream_layout(rng, n_seq, prefix, steps):
    """Cell owners of a KV stream that holds several sequences (the MTP heads' cache): each
    sequence's prompt in one run of cells, then decode steps that append one cell per
    sequence in turn."""
    owner = [s for s in range(n_seq) for _ in range(prefix)]
    for _ in range(steps):
        owner += list(rng.permutation(n_seq))
    return np.array(owner)


@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("n_rows", [1, 2, 4])
def test_a_query_among_other_sequences_cells_equals_the_query_over_its_own_cells(gqa, n_rows):
    """The kernel skips spans of positions the mask closes to every row of a pass; a query
    over a stream shared by 8 sequences (its cells among the others', whole spans of them
    closed) equals, bit for bit, the same query over only its own cells without a mask."""
    rng = np.random.default_rng(100 + 10 * gqa + n_rows)
    owner = shared_stream_layout(rng, n_seq=8, prefix=90, steps=40)
    n_kv, d = len(owner), 64
    own = [1, 5, 6]                                   # sequences with queries, n_rows each
    q, k, v = random_qkv(n_rows + gqa, len(own) * n_rows, N_HEAD_KV * gqa, N_HEAD_KV, n_kv, d)
    mask = np.full((len(own) * n_rows, n_kv), -np.inf, dtype=np.float32)
    for j, s in enumerate(own):
        cells = np.flatnonzero(owner == s)
        for r in range(n_rows):                       # a verify's causal rows over the sequence
            mask[j * n_rows + r, cells[:len(cells) - n_rows + r + 1]] = 0.0
    out = attend(q, k, v, mask, n_head_kv=N_HEAD_KV, n_threads=1)
    for i in range(q.shape[0]):
        cells = np.flatnonzero(mask[i] == 0.0)
        alone = attend(q[i:i + 1], k[cells], v[cells], None, n_head_kv=N_HEAD_KV, n_threads=1)
        assert np.array_equal(out[i].view(np.uint32), alone[0].view(np.uint32)), \
            f"query {i}: over the shared stream it differs from the query over its {len(cells)} own cells"
    # and every row of the pass equals its one-query result, with threads splitting the work
    assert_rows_match_alone(q, k, v, mask, n_head_kv=N_HEAD_KV, n_threads=2)
