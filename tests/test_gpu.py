"""Exactness on a CUDA GPU (opt-in: ``pytest -m gpu``; skipped where the build or the machine
has no CUDA device).

Speculative decoding is lossless only if a token's logits have the same bits whether it is
decoded alone or as one row of a verify batch. On the GPU that rests on the CUDA kernels:
the matrix products (one-row and few-row kernels, the tiled kernels, cuBLAS) and flash
attention (one-query and multi-query kernels, KV split across blocks). These tests run each
op as a model runs it through the kernel probes on the device and compare every row of an
n-row call with the row computed alone, then check greedy MTP output against plain output
with every layer on the GPU.
"""
from __future__ import annotations

import numpy as np
import pytest

from kernel_probes import BLOCK, F16, TYPES, attend, batches_and_rows_alone, random_qkv, rows_that_differ, verify_mask
from pyllama_mtp.config import ModelConfig
from pyllama_mtp.engine import Model, build_info
from test_exact_quantized import (assert_eight_sequences_together_equal_each_alone,
                                  assert_exact_after_a_long_prompt_with_wrapped_windows, assert_mtp_equals_plain,
                                  write_model)


def cuda_device() -> str | None:
    names = [d["name"] for d in build_info()["devices"] if d["name"].startswith("CUDA")]
    return names[0] if names else None


DEVICE = cuda_device()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="no CUDA device in this build or machine")]

ROW_COUNTS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 33, 64]
QUERY_COUNTS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16]


def gpu_shapes(type_name: str):
    """(k, m): model-like widths, and one k that is not a multiple of 256 where the block allows."""
    return [(1024, 512), (2048, 256)] + ([(544, 128)] if BLOCK[type_name] < 256 else [(1280, 128)])


@pytest.mark.parametrize("type_name", list(TYPES))
def test_gpu_matmul_rows_equal_one_row_products_bit_for_bit(type_name):
    rng = np.random.default_rng(TYPES[type_name] + 100)
    differ = []
    for k, m, n, batch, alone in batches_and_rows_alone(type_name, gpu_shapes(type_name), ROW_COUNTS, rng,
                                                        device=DEVICE):
        rows = rows_that_differ(batch, alone)
        if rows:
            differ.append(f"k={k} m={m} n={n}: {len(rows)} rows differ (max |diff| {float(np.max(np.abs(batch - alone))):.3g})")
    assert not differ, f"{type_name} on {DEVICE}:\n" + "\n".join(differ)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n_kv", [256, 1024, 4096])
def test_gpu_flash_attention_queries_equal_one_query_bit_for_bit(d, n_kv):
    n_head_kv, gqa = 2, 4
    differ = []
    for n_q in QUERY_COUNTS:
        q, k, v = random_qkv(1000 * n_q + n_kv + d, n_q, n_head_kv * gqa, n_head_kv, n_kv, d)
        mask = verify_mask(n_q, n_kv)
        batch = attend(q, k, v, mask, n_head_kv=n_head_kv, n_threads=1, kv_type=F16, device=DEVICE)
        for i in range(n_q):
            alone = attend(q[i:i + 1], k, v, mask[i:i + 1], n_head_kv=n_head_kv, n_threads=1, kv_type=F16,
                           device=DEVICE)
            if not np.array_equal(batch[i].view(np.uint32), alone[0].view(np.uint32)):
                differ.append(f"n_q={n_q} query {i} (max |diff| {float(np.max(np.abs(batch[i] - alone[0]))):.3g})")
    assert not differ, f"d={d} n_kv={n_kv} on {DEVICE}:\n" + "\n".join(differ)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n_head", [32, 64, 100, 160])
def test_gpu_flash_attention_does_not_depend_on_masked_cells_past_the_end(n_head, d):
    """The KV length a graph sees is padded to 256 from the cells in use, so a verify batch can
    see more (masked) cells than the one-token decode of the same token did; how the KV range
    is split across blocks must not change with it. Many heads: the split upstream picks for
    occupancy then depends on the length."""
    n_head_kv = n_head // 4
    differ = []
    for short in (256, 512, 1024):
        for long in (short + 256, 2048, 4096):
            q, k, v = random_qkv(short + long + n_head, 1, n_head, n_head_kv, long, d)
            mask = np.where(np.arange(long)[None, :] < short - 7, 0.0, -np.inf).astype(np.float32)
            full = attend(q, k, v, mask, n_head_kv=n_head_kv, n_threads=1, device=DEVICE)
            cut = attend(q, k[:short], v[:short], mask[:, :short], n_head_kv=n_head_kv, n_threads=1, device=DEVICE)
            if not np.array_equal(full.view(np.uint32), cut.view(np.uint32)):
                differ.append(f"{short} vs {long} cells: max |diff| {float(np.max(np.abs(full - cut))):.3g}")
    assert not differ, f"n_head={n_head} d={d} on {DEVICE}:\n" + "\n".join(differ)


@pytest.fixture(scope="module", params=[("F16", "random"), ("Q4_K_M", "random"), ("Q8_0", "random"),
                                        ("Q4_K_M", "oracle")], ids=lambda p: "-".join(p))
def gpu_model(request, tmp_path_factory):
    """The models of test_exact_quantized.py (F16 too), every layer on the GPU."""
    path = write_model(tmp_path_factory.mktemp("gpu-exact"), *request.param)
    with Model(ModelConfig(str(path), load_mtp=True, n_gpu_layers=-1)) as m:
        yield m


def test_every_layer_is_on_the_gpu(gpu_model):
    assert DEVICE in [dev.name for dev in gpu_model.devices]


@pytest.mark.parametrize("draft", [1, 3])
def test_gpu_greedy_mtp_equals_plain_over_500_tokens(gpu_model, draft):
    assert_mtp_equals_plain(gpu_model, draft)


def test_gpu_greedy_mtp_equals_plain_after_a_long_prompt_with_wrapped_windows(gpu_model):
    assert_exact_after_a_long_prompt_with_wrapped_windows(gpu_model)


def test_gpu_eight_sequences_together_equal_each_alone(gpu_model):
    assert_eight_sequences_together_equal_each_alone(gpu_model)


_CHECK_SCRIPT = """
import sys
from pyllama_mtp import InexactVerifyError, Llama
try:
    with Llama(sys.argv[1], mtp=True, draft=3, n_gpu_layers=-1, n_ctx=256) as llm:
        print("exact" if llm.exactness.exact else "not exact")
except InexactVerifyError as e:
    print("refused:", e)
"""


def test_the_load_time_check_passes_on_the_gpu_and_refuses_upstreams_kernels(tmp_path):
    """pyllama_mtp.exactness on the GPU: with patch 0019's batch-invariant paths the check
    passes; with them off (GGML_CUDA_BATCH_INVARIANT=0: upstream's batched kernels, read
    once per process) Llama refuses to draft."""
    import os
    import subprocess
    import sys
    path = write_model(tmp_path, "F16", "random")
    outputs = {}
    for invariant in ("1", "0"):
        run = subprocess.run([sys.executable, "-c", _CHECK_SCRIPT, str(path)], capture_output=True, text=True,
                             timeout=600, env={**os.environ, "GGML_CUDA_BATCH_INVARIANT": invariant})
        assert run.returncode == 0, run.stderr[-3000:]
        outputs[invariant] = run.stdout.strip()
    assert outputs["1"] == "exact"
    assert outputs["0"].startswith("refused:") and DEVICE in outputs["0"], outputs["0"]
