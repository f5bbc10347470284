"""MTP speculative decoding is lossless: greedy output with MTP equals plain greedy
output token for token, for every draft length and batch layout; rollback is exact;
the sliding-window guard catches the unsafe layout."""
from __future__ import annotations

import re

import numpy as np
import pytest

from pyllama_mtp import Llama
from pyllama_mtp.config import ContextConfig, ModelConfig
from pyllama_mtp.engine import Model, Session

from conftest import first_diff, fresh_logits, greedy_continuation

N_GEN = 320          # many times the sliding window (8)
WINDOW = 8


def prompt_of(llm, n):
    """A deterministic prompt of exactly n tokens."""
    rng = np.random.default_rng(n)
    return [int(t) for t in rng.integers(3, llm.info.n_vocab - 8, size=n)]


@pytest.fixture(scope="module")
def plain(step35_path):
    with Llama(step35_path, n_ctx=1024, threads=2) as llm:
        yield llm


@pytest.fixture(scope="module")
def mtp3(step35_path):
    with Llama(step35_path, n_ctx=1024, threads=2, mtp=True, draft=3) as llm:
        yield llm


@pytest.mark.parametrize("prompt_len", [1, WINDOW // 2, 3 * WINDOW + 1])
def test_greedy_mtp_equals_plain_across_swa_window(plain, mtp3, prompt_len):
    prompt = prompt_of(plain, prompt_len)
    expected = plain.generate(prompt, max_tokens=N_GEN).tokens
    assert len(expected) == N_GEN
    for draft in (1, 2, 3):
        got = mtp3.generate(prompt, max_tokens=N_GEN, draft=draft)
        assert got.tokens == expected, f"draft={draft} diverged at {first_diff(got.tokens, expected)}"
        assert got.stats.drafted > 0


@pytest.mark.parametrize("seed", [21, 22, 23, 24])
def test_greedy_mtp_equals_plain_on_more_random_models(tmp_path, seed):
    """Near-ties between the top two logits are where batch-dependent arithmetic
    would flip a greedy token: more models, more chances to catch one."""
    import factories as testing
    path = str(testing.write_step35(tmp_path / f"s{seed}.gguf", seed=seed, n_swa=8))
    with Llama(path, n_ctx=1024, threads=2) as plain_llm:
        prompt = prompt_of(plain_llm, 7)
        expected = plain_llm.generate(prompt, max_tokens=N_GEN).tokens
    with Llama(path, n_ctx=1024, threads=2, mtp=True, draft=3) as llm:
        for draft in (1, 3):
            assert llm.generate(prompt, max_tokens=N_GEN, draft=draft).tokens == expected


@pytest.mark.parametrize("n_ubatch", [4, 512])
def test_greedy_mtp_equals_plain_with_minimal_and_large_ubatch(step35_path, plain, n_ubatch):
    prompt = prompt_of(plain, 2 * WINDOW + 3)
    expected = plain.generate(prompt, max_tokens=N_GEN).tokens
    with Llama(step35_path, n_ctx=1024, threads=2, mtp=True, draft=3, n_ubatch=n_ubatch, n_batch=n_ubatch) as llm:
        assert llm.generate(prompt, max_tokens=N_GEN).tokens == expected


def test_drafts_do_not_depend_on_how_the_heads_caught_up(step35_path):
    """A head's first draft of a cycle shares its decode with the rows it catches up on;
    a second draft from the same pending token runs the draft rows alone. Both must give
    the same drafts and the same logits at every head."""
    with Model(ModelConfig(step35_path, load_mtp=True)) as model, \
            Session(model, ContextConfig(n_ctx=256, threads=2, draft_max=3), mtp_model=model) as s:
        s.prefill(prompt_of(model, 2 * WINDOW + 5))
        s.sample()
        first = s.draft(3), [s.head_logits(j) for j in range(3)]
        again = s.draft(3), [s.head_logits(j) for j in range(3)]
    assert first[0] == again[0]
    for j in range(3):
        np.testing.assert_allclose(first[1][j], again[1][j], atol=1e-5, err_msg=f"head {j}")


def _fresh_drafts(model, tokens):
    """Drafts and every head's logits of a session that caught up on `tokens` in one go."""
    with Session(model, ContextConfig(n_ctx=512, threads=2, draft_max=3), mtp_model=model) as s:
        s.prefill(tokens)
        s.sample()
        return s.draft(3), [s.head_logits(j) for j in range(3)]


@pytest.mark.parametrize("kind", ["oracle-0.6", "random"])
def test_heads_after_every_accept_pattern_and_rollback_equal_a_fresh_catch_up(tmp_path, kind):
    """Chained heads keep their past across cycles: draft rows whose tokens were all
    accepted stay as clean rows, the rest are re-run, and a rollback decodes enough
    tokens again for every head to be fed the previous head's outputs. After any
    history, the heads' drafts and logits equal those of heads that caught up on the
    same tokens in one go."""
    import factories as testing
    path = str(testing.write_step35(tmp_path / "m.gguf", seed=4, n_swa=8, oracle=kind != "random", acceptance=0.6))
    patterns, rng = set(), np.random.default_rng(0)
    with Model(ModelConfig(path, load_mtp=True)) as model, \
            Session(model, ContextConfig(n_ctx=512, threads=2, draft_max=3), mtp_model=model) as s:
        history = prompt_of(model, 9)
        s.prefill(history)
        pending = s.sample()
        for cycle in range(40):
            if cycle % 7 == 6:       # roll back 1-6 tokens (pending dropped), then go on
                n_keep = len(history) - int(rng.integers(1, 7))
                s.rollback(n_keep)
                history = history[:n_keep]
                pending = s.sample()
            k = 1 + cycle % 3
            drafts = s.draft(k)
            logits = [s.head_logits(j) for j in range(k)]
            want_drafts, want_logits = _fresh_drafts(model, history)
            assert drafts == want_drafts[:k], cycle
            for j in range(k):
                np.testing.assert_allclose(logits[j], want_logits[j], atol=1e-3, err_msg=f"cycle {cycle} head {j}")
            r = s.verify(drafts)
            patterns.add((k, r.n_accepted))
            history += [pending, *r.tokens[:-1]]
            pending = r.tokens[-1]
    if kind != "random":
        assert {(3, 0), (3, 1), (3, 2), (3, 3), (2, 2)} <= patterns, patterns


@pytest.mark.parametrize("n_batch", [64, 8])
def test_a_rollback_decodes_its_rows_again_with_the_next_prompt(tmp_path, n_batch):
    """The heads need the target's hidden states of the last tokens a rollback keeps, which
    only a decode gives back: a server slot that reuses a shared context rolls back on every
    request. Those tokens go in with the next prompt's rows, in its first decode (not a decode
    of their own, at the full context's cost); what the heads and the target then hold equals
    a fresh context's: the same drafts, the same logits, the same greedy continuation. A
    second rollback before the prompt, or a sample or catch-up straight after one, decodes
    them on their own first."""
    import factories as testing
    path = str(testing.write_step35(tmp_path / "m.gguf", seed=4, n_swa=8, oracle=True, acceptance=0.6))
    with Model(ModelConfig(path, load_mtp=True)) as model, \
            Session(model, ContextConfig(n_ctx=512, threads=2, draft_max=3, n_batch=n_batch, n_ubatch=n_batch),
                    mtp_model=model) as s:
        history = prompt_of(model, 40)            # what the target's KV cache holds
        s.prefill(history)
        pending = s.sample()
        turns = [(30, 12, None), (25, 3, "rollback"), (33, 20, None), (2, 5, None), (28, 1, "catch_up"),
                 (35, 9, "sample")]
        for turn, (n_keep, extra, before) in enumerate(turns):
            for _ in range(4):                    # steps past the prompt, drafts accepted or not
                r = s.step(3)
                history += [pending, *r.tokens[:-1]]
                pending = r.tokens[-1]
            assert s.n_past == len(history)
            s.rollback(n_keep)
            history = history[:n_keep]
            if before == "rollback":
                n_keep -= 2
                s.rollback(n_keep)
                history = history[:n_keep]
            elif before == "catch_up":
                s.seq_mtp_catch_up(0)
            elif before == "sample":
                assert s.sample() == int(np.argmax(fresh_logits(model, history)))
            assert s.n_past == len(history)
            new = prompt_of(model, 100 + turn)[:extra]
            decodes = s.stats()["n_target_decodes"]
            s.prefill(new)
            history += new
            if before is None:                    # 3 chained heads: 3 tokens again, at most
                assert s.stats()["n_target_decodes"] - decodes == -(-(extra + min(n_keep, 3)) // n_batch), turn
            np.testing.assert_array_equal(s.logits(), fresh_logits(model, history), err_msg=f"turn {turn}")
            pending = s.sample()
            want_drafts, want_logits = _fresh_drafts(model, history)
            assert s.draft(3) == want_drafts, turn
            for j in range(3):
                np.testing.assert_allclose(s.head_logits(j), want_logits[j], atol=1e-3,
                                           err_msg=f"turn {turn} head {j}")
            want = greedy_continuation(model, history, 12)
            start = len(history)
            while len(history) < start + 12:
                r = s.step(3)
                history += [pending, *r.tokens[:-1]]
                pending = r.tokens[-1]
            assert history[start:start + 12] == want[:12], \
                f"turn {turn}: diverged at {first_diff(history[start:], want)}"


def _plain_tokens(model, prompt, n):
    """The target's greedy output after ``prompt``: n tokens, one plain step at a time."""
    with Session(model, ContextConfig(n_ctx=1024, threads=2)) as s:
        s.prefill(prompt)
        out = [s.sample()]
        while len(out) < n:
            out += s.step(0).tokens
        return out[:n]


@pytest.mark.parametrize("n_mtp", [3, 1, "qwen35"])
def test_heads_skip_rows_while_decoding_plainly_and_draft_right_after_the_gap(tmp_path, n_mtp):
    """With a window set (seq_mtp_window), plain decoding leaves the heads only the newest
    rows: they skip the rest unprocessed (a gap in their KV, at the rows' own positions),
    so switching to drafting catches up on little more than the window (a quarter more, at
    least 2 rows). After the gap every
    head still pairs each token with the right hidden state: on an oracle whose heads agree
    with the trunk every draft is accepted, after rollbacks into, before and after the gap
    too; and the output is the plain greedy output throughout. Chained heads (step35), one
    head, and one head after a hybrid recurrent trunk (qwen35)."""
    import factories as testing
    if n_mtp == "qwen35":                         # one head after a hybrid (recurrent) trunk
        path = str(testing.write_qwen35(tmp_path / "m.gguf", seed=3, oracle=True, acceptance=1.0))
    else:
        path = str(testing.write_step35(tmp_path / "m.gguf", seed=5, n_swa=8, n_mtp=n_mtp, oracle=True,
                                        acceptance=1.0))
    k = 3
    window = 8                                    # at least heads + 1: taken as it is
    with Model(ModelConfig(path, load_mtp=True)) as model, \
            Session(model, ContextConfig(n_ctx=1024, threads=2, draft_max=k, n_batch=64, n_ubatch=64),
                    mtp_model=model) as s:
        prompt = prompt_of(model, 20)
        s.prefill(prompt)
        out = [s.sample()]                        # generated tokens; the last one is pending

        def plain(n):
            for _ in range(n):
                out.extend(s.step(0).tokens)

        def drafting(n):
            for _ in range(n):
                r = s.step(k)
                assert r.n_accepted == k, f"after {len(out)} tokens: {r.n_accepted} of {k} drafts accepted"
                out.extend(r.tokens)

        s.seq_mtp_window(0, window)
        plain(150)
        skipped = s.stats()["n_rows_skipped"]
        assert skipped >= len(prompt) + 150 - 2 * window - 1
        assert window <= s.seq_mtp_queued(0) < window + max(2, window // 4)
        s.seq_mtp_window(0, 0)                    # drafting again: every row from here on
        drafting(5)
        plain(40)                                 # no window: rows queue up and are taken
        assert s.stats()["n_rows_skipped"] == skipped
        drafting(3)
        gap_start = s.n_past                      # the heads hold every row before this one
        s.seq_mtp_window(0, window)
        plain(60)
        gap_end = s.n_past - s.seq_mtp_queued(0)  # and the newest ones from about here
        drafting(3)
        # after, inside and before the gap (within what the sliding-window ring still holds;
        # a recurrent trunk rolls back no further than its snapshots)
        for n_keep in () if n_mtp == "qwen35" else (gap_end + 10, gap_end - 20, gap_start - 5):
            s.rollback(n_keep)                    # keeps prompt + out[:n_keep - len(prompt)]
            del out[n_keep - len(prompt):]
            out.append(s.sample())
            drafting(3)
            s.seq_mtp_window(0, window)
            plain(40)
            s.seq_mtp_window(0, 0)
            drafting(2)
        assert s.stats()["n_rows_skipped"] > skipped
    with Model(ModelConfig(path)) as model:
        want = _plain_tokens(model, prompt, len(out))
    assert out == want, f"diverged at {first_diff(out, want)}"


@pytest.mark.parametrize("then", ["prefill", "prefill 1", "sample"])
def test_a_rollback_while_decoding_plainly_decodes_no_kept_token_again(tmp_path, then):
    """A server slot rolls back to the shared context on every request. While its sequence
    decodes plainly (a window set) the heads skip old rows anyway, so the rollback decodes
    no kept token again (with the heads drafting it would decode one per chained head, for
    their hidden states): a prompt of n_batch tokens after it takes one decode, not two,
    and every head starts after a gap. A sample straight after the rollback decodes the
    last kept token again, for its logits. Drafting right after (a 1-token prompt, or
    that sample) still finds every head's input, every draft of the oracle is accepted,
    and the output is the plain greedy output."""
    import factories as testing
    path = str(testing.write_step35(tmp_path / "m.gguf", seed=5, n_swa=8, oracle=True, acceptance=1.0))
    n_batch = 8
    with Model(ModelConfig(path, load_mtp=True)) as model, \
            Session(model, ContextConfig(n_ctx=512, threads=2, draft_max=3, n_batch=n_batch, n_ubatch=n_batch),
                    mtp_model=model) as s:
        history = prompt_of(model, 30)            # what the target holds, then the pending token
        s.prefill(history)
        pending = s.sample()
        for turn, n_keep in enumerate((40, 25, 52)):
            s.seq_mtp_window(0, 8)                # decoding plainly
            while len(history) < n_keep + 12:
                r = s.step(0)
                history += [pending, *r.tokens[:-1]]
                pending = r.tokens[-1]
            s.rollback(n_keep)
            history = history[:n_keep]
            decodes = s.stats()["n_target_decodes"]
            if then == "sample":                  # the kept token again, on its own
                pending = s.sample()
                assert s.stats()["n_target_decodes"] - decodes == 1
            else:
                new = prompt_of(model, 100 + turn)[:n_batch if then == "prefill" else 1]
                s.prefill(new)
                history += new
                assert s.stats()["n_target_decodes"] - decodes == 1, "one decode: the prompt alone"
                pending = s.sample()
            s.seq_mtp_window(0, 0)                # drafting again, straight away
            want = greedy_continuation(model, history, 16)
            start = len(history)
            while len(history) < start + 16:
                r = s.step(3)
                assert r.n_accepted == 3, f"turn {turn}: {r.n_accepted} of 3 drafts accepted"
                history += [pending, *r.tokens[:-1]]
                pending = r.tokens[-1]
            assert history[start:start + 16] == want[:16], f"turn {turn}: diverged at {first_diff(history[start:], want)}"


def test_a_window_of_rows_is_checked(step35_path):
    """A negative window or an unknown sequence is refused with a clear error; without
    heads a window is accepted and changes nothing."""
    from pyllama_mtp.errors import InvalidArgumentError
    with Model(ModelConfig(step35_path, load_mtp=True)) as model:
        with Session(model, ContextConfig(n_ctx=256, threads=1, draft_max=3), mtp_model=model) as s:
            with pytest.raises(InvalidArgumentError, match="n_rows must be >= 0"):
                s.seq_mtp_window(0, -1)
            with pytest.raises(InvalidArgumentError):
                s.seq_mtp_window(5, 8)
            s.prefill(prompt_of(model, 12))
            s.sample()
            assert s.step(3).n_drafted == 3      # the session still works
        with Session(model, ContextConfig(n_ctx=256, threads=1)) as s:
            s.seq_mtp_window(0, 8)
            s.prefill(prompt_of(model, 12))
            assert s.sample() == int(np.argmax(fresh_logits(model, prompt_of(model, 12))))


@pytest.mark.parametrize("n_ubatch", [4, 16])
def test_logits_equal_plain_bit_for_bit_after_the_sliding_window_ring_wraps(step35_path, n_ubatch):
    """The sliding-window cache is a ring of n_swa + n_ubatch cells (at least 256 here).
    Once it wraps, a verify batch must put every position in the same cell as one-token
    decodes do: attention visits cells in index order, so another placement changes the
    logits' last bits (and could flip a greedy near-tie). Logprobs show those bits."""
    from pyllama_mtp.config import SamplingParams
    greedy = SamplingParams(n_logprobs=0)

    def run(draft):
        with Model(ModelConfig(step35_path, load_mtp=True)) as m, \
                Session(m, ContextConfig(n_ctx=1024, n_ubatch=n_ubatch, n_batch=64, threads=1, draft_max=3),
                        mtp_model=m if draft else None) as s:
            s.set_sampling(greedy)
            s.prefill(prompt_of(m, 5))
            s.sample()
            out = list(zip(s.last_result.tokens, s.last_result.logprobs))
            while len(out) < 700:
                r = s.step(draft)
                out.extend(zip(r.tokens, r.logprobs))
            return out[:700]

    plain = run(0)
    for draft in (1, 3):
        got = run(draft)
        assert got == plain, f"draft {draft}: first difference at {first_diff(got, plain)}"


def test_n_ubatch_is_raised_to_hold_a_whole_verify_batch(step35_path):
    with Llama(step35_path, n_ctx=256, threads=1, mtp=True, draft=3, n_ubatch=1, n_batch=1) as llm:
        assert llm.session.n_ubatch == 4


def test_trunk_only_plus_mtp_only_pair_is_lossless(step35_pair):
    trunk, mtp_only = step35_pair
    with Llama(trunk, n_ctx=1024, threads=2) as plain_llm:
        prompt = prompt_of(plain_llm, 11)
        expected = plain_llm.generate(prompt, max_tokens=N_GEN).tokens
    with Llama(trunk, n_ctx=1024, threads=2, mtp=mtp_only, draft=3) as llm:
        for draft in (1, 2, 3):
            got = llm.generate(prompt, max_tokens=N_GEN, draft=draft)
            assert got.tokens == expected
            assert got.stats.drafted > 0


def test_oracle_model_accepts_almost_everything_and_takes_bonus_tokens(oracle_path):
    with Llama(oracle_path, n_ctx=512, threads=2) as plain_llm:
        expected = plain_llm.generate("a", max_tokens=120).tokens
    with Llama(oracle_path, n_ctx=512, threads=2, mtp=True, draft=3) as llm:
        got = llm.generate("a", max_tokens=120)
    assert got.tokens == expected
    assert got.stats.acceptance_rate > 0.9
    assert got.stats.mean_accepted_length > 2.5   # most steps accept all 3 and add a bonus token


def test_streamed_chunks_say_which_tokens_came_from_the_draft(oracle_path):
    with Llama(oracle_path, n_ctx=512, threads=2, mtp=True, draft=3) as llm:
        chunks = list(llm.stream("a", max_tokens=60))
    flags = [f for c in chunks for f in c.from_draft]
    assert sum(flags) > len(flags) // 2
    for c in chunks[1:-1]:
        assert c.from_draft[-1] is False  # the token sampled by the target closes every step


def test_mtp_and_plain_give_same_output_with_penalties(plain, mtp3):
    prompt = prompt_of(plain, 5)
    kw = dict(max_tokens=120, repeat_penalty=1.3, frequency_penalty=0.2)
    assert mtp3.generate(prompt, **kw).tokens == plain.generate(prompt, **kw).tokens


def test_stats_count_drafts_per_position(mtp3, plain):
    mtp3.reset_stats()
    result = mtp3.generate(prompt_of(plain, 3), max_tokens=60, draft=3)
    stats = mtp3.stats
    assert stats.drafted == result.stats.drafted > 0
    assert stats.drafted_per_position[0] >= stats.drafted_per_position[1] >= stats.drafted_per_position[2] > 0
    assert 0.0 <= stats.acceptance_rate <= 1.0
    assert len(stats.acceptance_per_position) == 3


def test_llm_stats_carry_the_timings_of_every_call(mtp3, plain):
    # the README's quickstart prints llm.stats: it must show a decode speed, not 0.0 tok/s
    mtp3.reset_stats()
    first = mtp3.generate(prompt_of(plain, 3), max_tokens=20, draft=3)
    second = mtp3.generate(prompt_of(plain, 4), max_tokens=30, draft=0)
    stream = mtp3.stream(prompt_of(plain, 5), max_tokens=40)
    streamed = [len(next(stream).tokens) for _ in range(3)]
    stream.close()                      # a stream left early counts what it produced
    stats = mtp3.stats
    calls = (first.stats, second.stats)
    assert stats.n_generated == len(first.tokens) + len(second.tokens) + sum(streamed)
    assert stats.n_prompt_tokens == 3 + 4 + 5
    assert stats.t_generate_s >= sum(c.t_generate_s for c in calls) > 0
    # (a rate such as 1750.0 tok/s ends in "0.0 tok/s" too: match a zero rate only)
    assert stats.tokens_per_second > 0 and not re.search(r"(?<![\d.])0\.0 tok/s", str(stats))
    assert stats.drafted >= first.stats.drafted > 0
    mtp3.reset_stats()
    cleared = mtp3.stats
    assert (cleared.n_generated, cleared.drafted, cleared.tokens_per_second) == (0, 0, 0.0)


class TestRollback:
    """Force accept/reject patterns through the granular verbs and compare the
    target's next-token logits with a fresh context that never saw rejected tokens."""

    @pytest.fixture(scope="class")
    def model(self, step35_path):
        with Model(ModelConfig(step35_path, load_mtp=True)) as m:
            yield m

    @pytest.mark.parametrize("pattern", ["rrr", "arr", "aar", "aaa", "ar", "a", "r"])
    def test_every_accept_reject_pattern_leaves_exact_state(self, model, pattern):
        with Session(model, ContextConfig(n_ctx=256, threads=2, draft_max=3)) as s:
            prompt = list(range(10, 10 + 2 * WINDOW + 1))
            s.prefill(prompt)
            first = s.sample()
            history = prompt + [first]
            # learn the target's own greedy continuation to build drafts that will be accepted
            truth = greedy_continuation(model, history, len(pattern))
            drafts = [t if c == "a" else (t + 1) % model.info.n_vocab for t, c in zip(truth, pattern)]
            result = s.verify(drafts)
            n_acc = pattern.index("r") if "r" in pattern else len(pattern)
            assert result.n_accepted == n_acc
            assert list(result.tokens) == truth[:n_acc + 1]
            # the state now holds history + accepted drafts; the pending token is not decoded yet
            s.step(0)
            expected = fresh_logits(model, history + truth[:n_acc + 1])
            np.testing.assert_allclose(s.logits(), expected, rtol=1e-4, atol=1e-4)


def generate_tokens(session, prompt, n, draft):
    """Drive the granular session API; returns the tokens now in the KV cache."""
    session.reset()
    session.prefill(prompt)
    history, pending = list(prompt), session.sample()
    while len(history) < n:
        result = session.step(draft)
        history += [pending, *result.tokens[:-1]]
        pending = result.tokens[-1]
    session.step(0)   # decode the pending token too: the logits then follow all of history
    return history + [pending]


def test_swa_guard_catches_split_verify_and_recovers(tmp_path):
    """With n_ubatch=1 a verify batch is split over ubatches; on a model whose window
    nearly fills the 256-cell SWA cache, the later ubatches reuse cells that the next
    token still attends to. Unguarded, the target's state drifts from a plain run's;
    the guard detects the loss after each rollback and re-prefills, so the state stays
    identical to plain decoding with the same layout."""
    import factories as testing
    path = str(testing.write_step35(tmp_path / "wide-window.gguf", seed=11, n_swa=255))
    layout = dict(n_ctx=1024, threads=2, n_ubatch=1, n_batch=64)
    with Model(ModelConfig(path, load_mtp=True)) as model:
        drift = {}
        for guard in (True, False):
            config = ContextConfig(draft_max=3, unsafe_split_verify=True, swa_guard=guard, **layout)
            with Session(model, config) as s:
                assert s.n_ubatch == 1
                history = generate_tokens(s, [5], 300, draft=3)
                recoveries = s.stats()["swa_recoveries"]
                got = s.logits()
            with Session(model, ContextConfig(**layout)) as plain_session:
                plain_session.prefill(history)
                drift[guard] = float(np.abs(got - plain_session.logits()).max())
            if guard:
                assert recoveries > 0
        assert drift[True] < 1e-5, drift
        assert drift[False] > 1e-3, drift


def test_mtp_can_be_switched_off_per_call(mtp3, plain):
    prompt = prompt_of(plain, 4)
    off = mtp3.generate(prompt, max_tokens=40, mtp=False)
    assert off.stats.drafted == 0
    assert off.tokens == plain.generate(prompt, max_tokens=40).tokens


def test_greedy_mtp_equals_plain_with_f16_weights(tmp_path):
    """F16 weights take other CPU kernels (AMX tiles on CPUs that have them)."""
    import factories as testing
    path = str(testing.write_step35(tmp_path / "f16.gguf", seed=31, n_swa=8, dtype="f16", n_embd=128))
    with Llama(path, n_ctx=1024, threads=2) as plain_llm:
        prompt = prompt_of(plain_llm, 9)
        expected = plain_llm.generate(prompt, max_tokens=N_GEN).tokens
    with Llama(path, n_ctx=1024, threads=2, mtp=True, draft=3) as llm:
        for draft in (1, 3):
            assert llm.generate(prompt, max_tokens=N_GEN, draft=draft).tokens == expected


@pytest.mark.parametrize("mtp", [False, True])
def test_a_rollback_behind_what_the_sliding_window_ring_still_holds_is_refused(step35_path, mtp):
    """The sliding-window layers keep a ring of n_swa + n_ubatch cells: after a long
    generation the ring no longer holds the positions just before an early rollback
    point, so no cell of the sequence is left there at all. That rollback must be refused
    (the window the next token attends to is gone), not pass as if nothing were missing;
    a new prompt that shares the early prefix then goes in afresh, and its output equals a
    fresh context's."""
    from pyllama_mtp.errors import SwaGuardError
    kw = dict(mtp=True, draft=3) if mtp else {}
    with Model(ModelConfig(step35_path, load_mtp=mtp)) as model, \
            Session(model, ContextConfig(n_ctx=1024, threads=2, draft_max=3 if mtp else 0, n_ubatch=64,
                                         n_batch=64), mtp_model=model if mtp else None) as s:
        s.prefill(prompt_of(model, 40))
        s.sample()
        while s.n_past < 40 + 400:               # far past the ring (8 + 64 cells, padded to 256)
            s.step(3 if mtp else 0)
        with pytest.raises(SwaGuardError, match="sliding-window"):
            s.rollback(30)
    first = prompt_of(model, 40)
    second = first[:30] + prompt_of(model, 12)
    with Llama(step35_path, n_ctx=1024, threads=2, n_ubatch=64, n_batch=64, **kw) as llm:
        llm.generate(first, max_tokens=400)
        reused = llm.generate(second, max_tokens=40).tokens
    with Llama(step35_path, n_ctx=1024, threads=2, n_ubatch=64, n_batch=64, **kw) as fresh:
        assert fresh.generate(second, max_tokens=40).tokens == reused
