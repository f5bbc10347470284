"""Rejection-sampling acceptance at temperature > 0: the verifier on fabricated
distributions (unit and chi-square tests), the sampler-transform distribution, and
end to end: MTP sampling reproduces plain sampling's token distribution."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from pyllama_mtp import Llama
from pyllama_mtp.config import SamplingParams
from pyllama_mtp.engine import rejection_verify, sampling_probs

ALPHA = 1e-3   # a correct verifier fails a test with this probability at most (fixed seeds: never flaky)


def random_dist(rng, v, sharp=1.0):
    logits = rng.normal(size=v) * sharp
    p = np.exp(logits - logits.max())
    return (p / p.sum()).astype(np.float32)


def chi_square_pvalue(counts, probs) -> float:
    """Goodness of fit of counts to probs, pooling the rare categories into one."""
    counts = np.asarray(counts, np.float64)
    expected = np.asarray(probs, np.float64) / float(np.sum(probs)) * counts.sum()
    rare = expected < 5
    obs = np.append(counts[~rare], counts[rare].sum())
    exp = np.append(expected[~rare], expected[rare].sum())
    keep = exp > 0
    return float(sps.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue)


def test_identical_distributions_accept_every_draft():
    rng = np.random.default_rng(0)
    p = np.stack([random_dist(rng, 16) for _ in range(4)])
    drafts = [int(rng.choice(16, p=p[j])) for j in range(3)]
    for seed in range(50):
        tokens, n_acc = rejection_verify(p, p[:3], drafts, seed)
        assert n_acc == 3 and tokens[:3] == drafts


def test_disjoint_distributions_reject_and_draw_from_the_target():
    v = 8
    p, q = np.zeros((2, v), np.float32), np.zeros((1, v), np.float32)
    p[0, 5] = 1.0
    p[1, 2] = 1.0
    q[0, 3] = 1.0
    tokens, n_acc = rejection_verify(p, q, [3], seed=1)
    assert (tokens, n_acc) == ([5], 0)


def test_all_accepted_takes_a_bonus_from_the_last_target_row():
    v = 8
    p = np.zeros((3, v), np.float32)
    p[0, 1] = p[1, 2] = p[2, 7] = 1.0
    tokens, n_acc = rejection_verify(p, p[:2], [1, 2], seed=3)
    assert (tokens, n_acc) == ([1, 2, 7], 2)


@pytest.mark.parametrize("case", range(4))
def test_first_emitted_token_follows_the_target_distribution(case):
    """d ~ q, verify against p: the first emitted token must be distributed as p."""
    rng = np.random.default_rng(100 + case)
    v, n_trials = 12, 6000
    p = np.stack([random_dist(rng, v, 1.5), random_dist(rng, v)])
    q = random_dist(rng, v, 1.5)[None, :]
    counts = np.zeros(v)
    for seed in range(n_trials):
        d = int(rng.choice(v, p=q[0] / q[0].sum()))
        tokens, _ = rejection_verify(p, q, [d], seed)
        counts[tokens[0]] += 1
    assert chi_square_pvalue(counts, p[0]) > ALPHA, (counts, p[0] * n_trials)


def test_second_token_follows_the_target_given_the_first_was_accepted():
    rng = np.random.default_rng(7)
    v, n_trials = 10, 8000
    p = np.stack([random_dist(rng, v, 0.3), random_dist(rng, v), random_dist(rng, v)])
    q = np.stack([random_dist(rng, v, 0.3), random_dist(rng, v, 2.0)])
    counts = np.zeros(v)
    for seed in range(n_trials):
        drafts = [int(rng.choice(v, p=q[j] / q[j].sum())) for j in range(2)]
        tokens, n_acc = rejection_verify(p, q, drafts, seed)
        if n_acc >= 1:
            counts[tokens[1]] += 1
    assert chi_square_pvalue(counts, p[1]) > ALPHA


def test_sampling_probs_apply_the_sampler_transforms():
    logits = np.array([3.0, 2.0, 1.0, 0.5, -1.0, -4.0], np.float32)
    greedy = sampling_probs(SamplingParams(temperature=0.0), logits)
    assert greedy.tolist() == [1, 0, 0, 0, 0, 0]
    full = sampling_probs(SamplingParams(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0), logits)
    np.testing.assert_allclose(full, np.exp(logits / 0.5) / np.exp(logits / 0.5).sum(), rtol=1e-5)
    top2 = sampling_probs(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0), logits)
    assert np.count_nonzero(top2) == 2 and top2.sum() == pytest.approx(1.0)
    nucleus = sampling_probs(SamplingParams(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0), logits)
    assert np.count_nonzero(nucleus) == 2   # softmax of the logits: 0.61, 0.22, ... reaches 0.7 after two
    minp = sampling_probs(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3), logits)
    assert np.count_nonzero(minp) == 2      # exp(-1) = 0.37 >= 0.3 > exp(-2)


def sample_histograms(path, n_runs, n_tokens, **mtp):
    kw = dict(max_tokens=n_tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    with Llama(path, n_ctx=256, threads=2, **mtp) as llm:
        runs = [llm.generate([7, 8, 9], seed=seed, **kw) for seed in range(n_runs)]
    return [r.tokens for r in runs], runs


def test_mtp_rejection_sampling_matches_plain_sampling_end_to_end(models_dir):
    """Token histograms at positions 1..3 (the ones MTP drafts) over many seeds: plain
    sampling and MTP with rejection sampling must come from the same distribution."""
    import factories as testing
    path = str(testing.write_step35(models_dir / "sampling-oracle.gguf", seed=8, oracle=True, acceptance=0.7))
    n_runs = 400
    plain, _ = sample_histograms(path, n_runs, 4)
    spec, runs = sample_histograms(path, n_runs, 4, mtp=True, draft=3, accept="rejection")
    assert sum(r.stats.drafted for r in runs) > 0
    for pos in (1, 2, 3):
        a = np.bincount([t[pos] for t in plain], minlength=512)
        b = np.bincount([t[pos] for t in spec], minlength=512)
        keep = (a + b) >= 10
        table = np.stack([a[keep], b[keep]])
        table = np.concatenate([table, np.stack([[a[~keep].sum()], [b[~keep].sum()]])], axis=1)
        table = table[:, table.sum(axis=0) > 0]
        assert sps.chi2_contingency(table).pvalue > ALPHA, f"position {pos}"


def test_rejection_accepts_more_than_match_at_high_temperature(models_dir):
    import factories as testing
    path = str(testing.write_step35(models_dir / "t-oracle.gguf", seed=8, oracle=True, acceptance=1.0))
    # the oracle's logits are very peaked; at temperature 8 its distributions are broad
    kw = dict(max_tokens=64, temperature=8.0, top_k=0, top_p=1.0, min_p=0.0)
    with Llama(path, n_ctx=256, threads=2, mtp=True, draft=3) as llm:
        rejection = llm.generate("a", seed=5, accept="rejection", **kw).stats
        match = llm.generate("a", seed=5, accept="match", **kw).stats
    assert rejection.acceptance_per_position_by_rule["rejection"]
    assert match.acceptance_per_position_by_rule["match"]
    assert rejection.acceptance_rate > match.acceptance_rate


def test_penalties_with_explicit_rejection_sampling_ask_for_match(oracle_path):
    from pyllama_mtp import InvalidArgumentError
    with Llama(oracle_path, n_ctx=128, threads=1, mtp=True, draft=2) as llm:
        with pytest.raises(InvalidArgumentError, match="accept='match'"):
            llm.generate("a", max_tokens=4, temperature=0.8, repeat_penalty=1.2, accept="rejection")
        assert llm.generate("a", max_tokens=4, temperature=0.8, repeat_penalty=1.2, accept="match").tokens
        # left to itself the Llama falls back to matching when penalties are on
        assert llm.generate("a", max_tokens=4, temperature=0.8, repeat_penalty=1.2).tokens


class TestLogprobs:
    """Logprobs of accepted drafts are the target's own, identical with MTP on and off."""

    @pytest.fixture(scope="class")
    def pair(self, models_dir):
        import factories as testing
        path = str(testing.write_step35(models_dir / "lp-oracle.gguf", seed=9, oracle=True, acceptance=0.8))
        with Llama(path, n_ctx=256, threads=2) as plain, Llama(path, n_ctx=256, threads=2, mtp=True, draft=3) as mtp:
            yield plain, mtp

    def test_greedy_logprobs_equal_with_mtp_on_and_off(self, pair):
        plain, mtp = pair
        a = plain.generate("a", max_tokens=40, logprobs=5)
        b = mtp.generate("a", max_tokens=40, logprobs=5)
        assert a.tokens == b.tokens and b.stats.accepted > 10
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
        assert [[t for t, _ in alts] for alts in a.top_logprobs] == [[t for t, _ in alts] for alts in b.top_logprobs]
        assert all(lp <= 0 for lp in b.logprobs)
        for tok, alts in zip(b.tokens, b.top_logprobs):
            assert alts[0][0] == tok and len(alts) == 5  # greedy: the chosen token is the most likely
            assert [lp for _, lp in alts] == sorted((lp for _, lp in alts), reverse=True)

    def test_streamed_chunks_carry_logprobs_for_drafted_tokens(self, pair):
        _, mtp = pair
        chunks = list(mtp.stream("a", max_tokens=30, logprobs=0))
        drafted = [(lp, d) for c in chunks for lp, d in zip(c.logprobs, c.from_draft)]
        assert any(d for _, d in drafted) and all(lp <= 0 for lp, _ in drafted)

    def test_openai_shapes_carry_logprobs(self, pair):
        from openai.types import Completion
        from openai.types.chat import ChatCompletion
        _, mtp = pair
        c = Completion.model_validate(mtp.create_completion("a", max_tokens=8, logprobs=2))
        assert len(c.choices[0].logprobs.token_logprobs) == 8
        chat = ChatCompletion.model_validate(mtp.create_chat_completion(
            [{"role": "user", "content": "a"}], max_tokens=6, logprobs=True, top_logprobs=3))
        assert len(chat.choices[0].logprobs.content) == 6
        assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 3
