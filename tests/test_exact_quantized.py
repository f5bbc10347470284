"""Greedy MTP output equals plain output on quantized models, where the verify batches run
through the batch-invariant kernels (vendor/patches/0014): Q4_K_M (repacked Q4_K, Q6_K, MTP
heads at Q8_0), Q8_0 and Q4_0 (repacked), over 500 tokens, after a prompt longer than 2,048 tokens whose
sliding windows wrap, and with several sequences decoded together (verify batches of 8 to
32 rows, where the tiled K-quant kernel used to take over and sum in another order).

Tokens and their logprobs are compared: the logprobs show the logits' last bits."""
from __future__ import annotations

import numpy as np
import pytest

import factories as testing
from pyllama_mtp.config import ContextConfig, ModelConfig, SamplingParams
from pyllama_mtp.engine import Model, Session
from pyllama_mtp.tools.quantize import quantize

from conftest import first_diff

N_EMBD = 512          # two 256-blocks per row: the sum over blocks is where batch paths differed
GREEDY = SamplingParams(n_logprobs=0)


@pytest.fixture(scope="module", params=[("Q4_K_M", "random"), ("Q8_0", "random"), ("Q4_0", "random"), ("Q4_K_M", "oracle")],
                ids=lambda p: "-".join(p))
def quantized(request, tmp_path_factory):
    with Model(ModelConfig(str(write_model(tmp_path_factory.mktemp("exact-quantized"), *request.param)),
                           load_mtp=True)) as m:
        yield m


def write_model(d, ftype: str, kind: str):
    """A step35 in file type ``ftype``: ``kind`` "random" (varied greedy output, drafts
    mostly rejected: row 0 of every verify batch decides) or "oracle", whose heads agree
    with the trunk 60% of the time (every accept pattern occurs)."""
    oracle = dict(oracle=True, acceptance=0.6) if kind == "oracle" else {}
    src = testing.write_step35(d / "f32.gguf", seed=21, n_embd=N_EMBD, n_head=8, n_head_kv=2, head_dim=64,
                               n_swa=16, **oracle)
    out = d / f"{ftype}.gguf"
    quantize(src, out, ftype, threads=2)
    return out


def session(model, n_ctx, n_seq_max=1, threads=2):
    return Session(model, ContextConfig(n_ctx=n_ctx, n_ubatch=64, n_batch=256, threads=threads, draft_max=3,
                                        n_seq_max=n_seq_max))


def pairs(result):
    return list(zip(result.tokens, result.logprobs))


def decode(model, prompt, draft, n, n_ctx=1024):
    with session(model, n_ctx) as s:
        s.set_sampling(GREEDY)
        s.prefill(prompt)
        s.sample()
        out, drafted = pairs(s.last_result), 0
        while len(out) < n:
            r = s.step(draft)
            drafted += r.n_drafted
            out.extend(pairs(r))
        return out[:n], drafted


def prompt_of(model, length, seed):
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, model.info.n_vocab - 8, size=length)]


def assert_mtp_equals_plain(model, draft, n=500):
    prompt = prompt_of(model, 12, 1)
    plain, _ = decode(model, prompt, 0, n)
    mtp, drafted = decode(model, prompt, draft, n)
    assert drafted > 0
    assert mtp == plain, f"first difference at token {first_diff(mtp, plain)}"


def assert_exact_after_a_long_prompt_with_wrapped_windows(model):
    prompt = prompt_of(model, 2100, 2)       # > 2,048 tokens; the 16-token windows wrap
    plain, _ = decode(model, prompt, 0, 160, n_ctx=2400)
    mtp, drafted = decode(model, prompt, 3, 160, n_ctx=2400)
    assert drafted > 0
    assert mtp == plain, f"first difference at token {first_diff(mtp, plain)}"


def assert_eight_sequences_together_equal_each_alone(model):
    prompts = [prompt_of(model, 5 + 7 * i, 10 + i) for i in range(8)]
    n = 120
    alone = [decode(model, p, 3, n)[0] for p in prompts]
    with session(model, 1024, n_seq_max=8) as s:
        out = {}
        for seq, p in enumerate(prompts):
            s.seq_set_sampling(seq, GREEDY)
            s.seq_prefill(seq, p)
            out[seq] = pairs(s.seq_sample(seq))
        while any(len(v) < n for v in out.values()):
            active = [seq for seq in out if len(out[seq]) < n]
            for seq, r in zip(active, s.step_batch(active, [3] * len(active))):   # up to 32 verify rows
                out[seq].extend(pairs(r))
    for seq in out:
        assert out[seq][:n] == alone[seq], f"sequence {seq}: first difference at {first_diff(out[seq][:n], alone[seq])}"


@pytest.mark.parametrize("draft", [1, 2, 3])
def test_greedy_mtp_equals_plain_over_500_tokens(quantized, draft):
    assert_mtp_equals_plain(quantized, draft)


def test_greedy_mtp_equals_plain_after_a_long_prompt_with_wrapped_windows(quantized):
    assert_exact_after_a_long_prompt_with_wrapped_windows(quantized)


def test_eight_sequences_together_equal_each_alone(quantized):
    assert_eight_sequences_together_equal_each_alone(quantized)
