"""Logit parity with an independent implementation: Hugging Face transformers' step3p7
model (float32, CPU) and the GGUF the pinned converter makes from the same tiny random
Step-3.7 checkpoint (MTP blocks written by extract-mtp), run by this package's runtime.

* Trunk: next-token logits at every position agree to float32 rounding with exact
  attention (flash attention off, F32 KV cache); with the defaults (flash attention, F16
  KV cache) to about 1e-2, the F16 rounding of the cache.
* MTP heads: every head's draft logits agree to float32 rounding with transformers' MTP
  layers fed training's rows (each block after the first reads the previous block's
  hidden outputs at every position).
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import pinned_converter  # noqa: E402
from hf_reference import Reference  # noqa: E402
from factories import hf_checkpoint as hf_testing  # noqa: E402
from pyllama_mtp.config import ContextConfig, ModelConfig  # noqa: E402
from pyllama_mtp.engine import Model, Session  # noqa: E402
from pyllama_mtp.tools.extract_mtp import extract_mtp  # noqa: E402

pytestmark = pytest.mark.skipif(pinned_converter.missing() is not None, reason=str(pinned_converter.missing()))

N_POS = 300
EXACT = dict(type_k="f32", type_v="f32", flash_attn=False)
PREFIXES = range(4, 64, 6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    ckpt = hf_testing.write_checkpoint(d / "ckpt", arch="Step3p7ForConditionalGeneration", seed=7, dtype="F32")
    trunk = pinned_converter.convert(ckpt, d / "trunk.gguf", outtype="f32", split="trunk")
    mtp = extract_mtp(ckpt, d / "mtp.gguf", trunk=trunk, out_type="f32").path
    ids = [int(t) for t in np.random.default_rng(0).integers(3, 500, size=N_POS)]
    return Reference(ckpt), trunk, mtp, ids


def runtime_logits(path, ids, **ctx) -> np.ndarray:
    """[len(ids), n_vocab]: the logits after each prefix, one decode per token."""
    rows = []
    with Model(ModelConfig(str(path))) as model, Session(model, ContextConfig(n_ctx=512, threads=2, **ctx)) as s:
        for t in ids:
            s.prefill([t])
            rows.append(s.logits().copy())
    return np.array(rows)


def head_logits(trunk, mtp, prefix) -> np.ndarray:
    """[3, n_vocab]: each MTP head's draft logits after the prompt and its greedy token."""
    with Model(ModelConfig(str(trunk))) as t, Model(ModelConfig(str(mtp), load_mtp=True)) as m, \
            Session(t, ContextConfig(n_ctx=256, threads=2, draft_max=3, **EXACT), mtp_model=m) as s:
        s.prefill(prefix)
        s.sample()
        s.draft(3)
        return np.array([s.head_logits(j) for j in range(3)])


def test_trunk_logits_match_transformers_to_float32_rounding(setup):
    ref, trunk, _, ids = setup
    theirs = ref.trunk(ids)[0]
    ours = runtime_logits(trunk, ids, **EXACT)
    diff = np.abs(ours - theirs)
    print(f"trunk, exact attention: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}, logit std {theirs.std():.3g}")
    assert diff.max() < 1e-4
    assert (ours.argmax(1) == theirs.argmax(1)).all()


def test_trunk_logits_match_transformers_with_default_kernels(setup):
    ref, trunk, _, ids = setup
    theirs = ref.trunk(ids)[0]
    ours = runtime_logits(trunk, ids)
    diff = np.abs(ours - theirs)
    print(f"trunk, defaults: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}")
    assert diff.max() < 0.05 and diff.mean() < 5e-3
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.99


def test_chained_mtp_heads_follow_the_training_rows(setup):
    """Every head's draft logits equal transformers' MTP layers fed training's rows: block
    0 reads the trunk's hidden states, block k reads block k - 1's outputs at every
    position with the tokens shifted by k, and no row pairs the first token with a
    made-up hidden state (upstream's driver pairs it with zeros, and catches heads 2 and
    3 up on the trunk's hidden states)."""
    ref, trunk, mtp, ids = setup
    worst = np.zeros(3)
    for n in PREFIXES:
        ours = head_logits(trunk, mtp, ids[:n])
        theirs = ref.drafts(ids[:n], "stepfun")
        worst = np.maximum(worst, np.abs(ours - theirs).max(axis=1))
        assert (ours.argmax(1) == theirs.argmax(1)).all(), n
    print(f"MTP heads 0-2, training rows: max |diff| {worst}")
    assert worst.max() < 1e-4
