"""Several sequences decoded together in one session (n_seq_max > 1): every sequence's
greedy output equals its output alone, token for token, with MTP (draft 1..3, all
heads and the verify batched across sequences) and without, across many sliding
windows, when sequences join and leave mid-way (continuous batching), and when they
use different draft lengths in the same step. For step35 (sliding-window attention,
chained heads), qwen35/qwen35moe (recurrent state per sequence, rolled back by its
snapshots after every verify) and glm4moe (one MTP head)."""
from __future__ import annotations

import numpy as np
import pytest

import factories as testing
from pyllama_mtp.config import ContextConfig, ModelConfig, SamplingParams
from pyllama_mtp.engine import Model, Session
from pyllama_mtp.errors import InvalidArgumentError

from conftest import first_diff

N_GEN = 260          # > the sliding-window cache (256 cells with n_ubatch 16): its ring wraps
N_CTX = 1024
N_SEQ = 4
N_UBATCH = 16        # the same for alone and together: it sizes the sliding-window cache


def prompts(n_vocab, count):
    rng = np.random.default_rng(7)
    return [[int(t) for t in rng.integers(3, n_vocab - 8, size=int(rng.integers(1, 30)))] for _ in range(count)]


ARCHS = ["step35", "qwen35", "qwen35moe", "glm4moe"]


def model_path(request, models_dir, arch):
    if arch == "step35":
        return request.getfixturevalue("step35_path")
    if arch == "glm4moe":
        return str(testing.write_glm4moe(models_dir / "glm4moe-parallel.gguf", seed=2))
    return str(testing.write_qwen35(models_dir / f"{arch}-parallel.gguf", seed=1, moe=arch == "qwen35moe"))


@pytest.fixture(scope="module", params=ARCHS)
def model(request, models_dir):
    with Model(ModelConfig(model_path(request, models_dir, request.param), load_mtp=True)) as m:
        yield m


@pytest.fixture(scope="module")
def expected(model):
    """expected(i, draft): prompt i's output decoded alone with that draft length."""
    ps = prompts(model.info.n_vocab, 8)
    cache = {}

    def get(i, draft):
        if (i, draft) not in cache:
            cache[(i, draft)] = alone(model, ps[i], draft)
        return cache[(i, draft)]
    return get


def session(model, n_seq_max, draft_max=3, **kw):
    return Session(model, ContextConfig(n_ctx=N_CTX, n_ubatch=N_UBATCH, n_batch=64, threads=1,
                                        draft_max=draft_max, n_seq_max=n_seq_max, **kw))


GREEDY = SamplingParams(n_logprobs=0)   # greedy, with each token's logprob: the logits' last bits show


def pairs(result):
    return list(zip(result.tokens, result.logprobs))


def alone(model, prompt, draft, n=N_GEN):
    """The sequence's greedy output decoded in a session of its own: (token, logprob) pairs."""
    with session(model, 1) as s:
        s.set_sampling(GREEDY)
        s.prefill(prompt)
        s.sample()
        out = pairs(s.last_result)
        while len(out) < n:
            out.extend(pairs(s.step(draft)))
        return out[:n]


def together(sess, jobs, n=N_GEN, sampling=GREEDY):
    """jobs: (seq, prompt, draft, start_step). Steps every started, unfinished sequence
    together; returns each job's first n (token, logprob) pairs."""
    out = {seq: None for seq, *_ in jobs}
    step = 0
    while any(v is None or len(v) < n for v in out.values()):
        for seq, prompt, _draft, start in jobs:
            if start == step:
                sess.seq_reset(seq)
                if sampling is not None:
                    sess.seq_set_sampling(seq, sampling)
                sess.seq_prefill(seq, prompt)
                out[seq] = pairs(sess.seq_sample(seq))
        active = [(seq, draft) for seq, _p, draft, _s in jobs if out[seq] is not None and len(out[seq]) < n]
        if active:
            results = sess.step_batch([a for a, _ in active], [d for _, d in active])
            for (seq, _), r in zip(active, results):
                out[seq].extend(pairs(r))
        step += 1
    return {seq: toks[:n] for seq, toks in out.items()}


def tokens(out):
    return [t for t, _ in out]


@pytest.mark.parametrize("draft", [0, 1, 2, 3])
def test_sequences_stepped_together_equal_each_alone(model, expected, draft):
    """Tokens and logprobs (the logits' last bits) equal the sequence's alone, and the
    tokens equal plain greedy decoding."""
    ps = prompts(model.info.n_vocab, N_SEQ)
    with session(model, N_SEQ) as s:
        got = together(s, [(i, p, draft, 0) for i, p in enumerate(ps)])
        stats = s.stats()
    for i in range(N_SEQ):
        assert got[i] == expected(i, draft), f"sequence {i} diverged at {first_diff(got[i], expected(i, draft))}"
        assert tokens(got[i]) == tokens(expected(i, 0))
    if draft:
        assert stats["n_drafted"] > 0
        assert stats["swa_recoveries"] == 0


def test_alone_with_mtp_equals_plain(expected):
    """The references agree: MTP alone gives the plain greedy tokens and logprobs, also
    after the sliding-window cache's ring wraps (patch 0011)."""
    assert expected(0, 3) == expected(0, 0)


def test_mixed_draft_lengths_in_one_step(model, expected):
    ps = prompts(model.info.n_vocab, N_SEQ)
    drafts = [3, 0, 1, 3]
    with session(model, N_SEQ) as s:
        got = together(s, [(i, p, drafts[i], 0) for i, p in enumerate(ps)])
    assert [got[i] for i in range(N_SEQ)] == [expected(i, drafts[i]) for i in range(N_SEQ)]


def test_sequences_join_and_leave_mid_way(model, expected):
    """Continuous batching: slots start at different steps, a finished slot takes a new
    prompt while the others keep going, and ids with gaps step together."""
    ps = prompts(model.info.n_vocab, 6)
    n = 150
    with session(model, N_SEQ) as s:
        first = together(s, [(0, ps[0], 3, 0), (2, ps[1], 3, 5), (3, ps[2], 2, 17)], n=n)
        # slots 0 and 3 take new prompts while slot 2's old KV is still there
        second = together(s, [(3, ps[3], 3, 0), (0, ps[4], 1, 9), (1, ps[5], 3, 30)], n=n)
    assert [first[0], first[2], first[3]] == [expected(0, 3)[:n], expected(1, 3)[:n], expected(2, 2)[:n]]
    assert [second[3], second[0], second[1]] == [expected(3, 3)[:n], expected(4, 1)[:n], expected(5, 3)[:n]]


def test_eight_sequences_with_three_drafts_fill_a_32_row_verify(model, expected):
    """32 verify rows in one target decode: the per-row kernels must hold beyond patch
    0001's 16 rows (patch 0008)."""
    ps = prompts(model.info.n_vocab, 8)
    with Session(model, ContextConfig(n_ctx=N_CTX, n_ubatch=N_UBATCH, n_batch=64, threads=1, draft_max=3,
                                      n_seq_max=8)) as s:
        got = together(s, [(i, p, 3, 0) for i, p in enumerate(ps)], n=200)
        assert s.n_ubatch == 32
    assert [got[i] for i in range(8)] == [expected(i, 3)[:200] for i in range(8)]


@pytest.mark.parametrize("kind", ["step35", "qwen35"])
def test_oracle_model_batched_drafts_are_accepted(tmp_path, kind):
    """Acceptance 0.6: every accept/reject pattern, and with qwen35 every depth of
    recurrent-state rollback, in sequences stepped together."""
    write = testing.write_step35 if kind == "step35" else testing.write_qwen35
    path = write(tmp_path / "oracle.gguf", seed=5, oracle=True, acceptance=0.6)
    with Model(ModelConfig(str(path), load_mtp=True)) as m:
        ps = prompts(m.info.n_vocab, 3)
        expected = [alone(m, p, 3, n=80) for p in ps]
        plain = [alone(m, p, 0, n=80) for p in ps]
        with session(m, 3) as s:
            got = together(s, [(i, p, 3, 0) for i, p in enumerate(ps)], n=80)
            stats = s.stats()
    assert [got[i] for i in range(3)] == expected
    assert [tokens(got[i]) for i in range(3)] == [tokens(p) for p in plain]
    assert stats["n_drafted"] > stats["n_accepted"] > 0.3 * stats["n_drafted"]
    assert set(stats["accepted_at"][:3]) != {0}


def test_sampling_at_temperature_is_per_sequence(model):
    """Each sequence has its own sampler and seed: two sequences with the same prompt
    and seed draw the same tokens side by side, a third seed draws others."""
    p = prompts(model.info.n_vocab, 1)[0]
    with session(model, 3) as s:
        for seq, seed in ((0, 11), (1, 11), (2, 12)):
            s.seq_set_sampling(seq, SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                                                   accept="match", n_logprobs=0))
        got = together(s, [(i, p, 2, 0) for i in range(3)], n=60, sampling=None)
    assert got[0] == got[1]
    assert got[0] != got[2]


def test_bad_sequence_ids_raise(model):
    with session(model, 2) as s:
        with pytest.raises(InvalidArgumentError, match="outside"):
            s.seq_prefill(2, [1, 2])
        s.seq_prefill(0, [1, 2])
        with pytest.raises(InvalidArgumentError, match="pending"):
            s.step_batch([0], [1])
        s.seq_sample(0)
        with pytest.raises(InvalidArgumentError, match="twice"):
            s.step_batch([0, 0], [1, 1])
        with pytest.raises(InvalidArgumentError):
            s.step_batch([0], [1, 2])


def test_logits_overwritten_by_another_sequence_are_not_sampled(model):
    with session(model, 2) as s:
        s.seq_prefill(0, [5, 6, 7])
        s.seq_prefill(1, [8, 9])
        with pytest.raises(InvalidArgumentError, match="overwritten"):
            s.seq_sample(0)
        s.seq_sample(1)


def test_several_sequences_need_flash_attention(model):
    with pytest.raises(InvalidArgumentError, match="flash attention"):
        session(model, 2, flash_attn=False)
