"""Llama.generate_batch: many prompts through one session with continuous batching. Every
sequence's greedy output equals the prompt's plain output alone, bit for bit, whatever the
draft (0..3, auto), with more prompts than slots (a finished sequence's slot takes the
next prompt) and generations long enough for the sliding-window cache to wrap; results
come in input order with their own stats; bad input is refused before anything runs."""
from __future__ import annotations

import numpy as np
import pytest

from pyllama_mtp import Llama

import factories as testing
from pyllama_mtp.errors import ContextFullError, InvalidArgumentError

N_CTX = 512
N_UBATCH = 16          # the same alone and together: it sizes the sliding-window cache
N_GEN = 270            # > the sliding-window cache (256 cells with n_ubatch 16): its ring wraps
SLOTS = 3


def prompts(n_vocab, count, seed=11):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, n_vocab - 8, size=int(rng.integers(1, 40)))] for _ in range(count)]


@pytest.fixture(scope="module", params=["step35", "qwen35"])
def pair(request):
    """(plain Llama decoding one sequence, MTP Llama with SLOTS slots) on the same model."""
    if request.param == "step35":
        path = request.getfixturevalue("step35_path")
    else:   # recurrent state per sequence, rolled back by its snapshots after every verify
        path = str(testing.write_qwen35(request.getfixturevalue("models_dir") / "qwen35-batch.gguf", seed=0))
    common = dict(n_ctx=N_CTX, n_ubatch=N_UBATCH, threads=2)
    with Llama(path, **common) as plain, Llama(path, mtp=True, draft=3, parallel=SLOTS, **common) as batch:
        yield plain, batch


@pytest.mark.parametrize("draft", [0, 1, 2, 3, "auto"])
def test_every_sequence_equals_its_plain_output_alone(pair, draft):
    plain, batch = pair
    ps = prompts(plain.info.n_vocab, 2 * SLOTS + 1)           # more prompts than slots
    alone = [plain.generate(p, max_tokens=N_GEN).tokens for p in ps]
    results = batch.generate_batch(ps, max_tokens=N_GEN, draft=draft)
    assert [r.tokens for r in results] == alone
    for r, p in zip(results, ps):
        assert r.n_prompt_tokens == len(p) and r.stats.n_generated == len(r.tokens)
        assert r.finish_reason in ("length", "stop")
    if draft in (1, 2, 3):
        assert all(r.stats.drafted > 0 and r.stats.n_steps > 0 for r in results)
        assert max(len(r.stats.acceptance_per_position) for r in results) <= draft
    if draft == 0:
        assert all(r.stats.drafted == 0 for r in results)


def test_results_keep_input_order_with_stop_strings_and_texts(pair):
    plain, batch = pair
    texts = ["one two three", "a", "the quick brown fox jumps over", "x y", "hello"]
    alone = [plain.generate(t, max_tokens=24) for t in texts]
    results = batch.generate_batch(texts, max_tokens=24)
    assert [r.text for r in results] == [a.text for a in alone]
    assert [r.tokens for r in results] == [a.tokens for a in alone]


def test_the_llama_still_generates_alone_after_a_batch(pair):
    plain, batch = pair
    p = prompts(plain.info.n_vocab, 1, seed=3)[0]
    batch.generate_batch(prompts(plain.info.n_vocab, 4, seed=4), max_tokens=20)
    assert batch.generate(p, max_tokens=40).tokens == plain.generate(p, max_tokens=40).tokens


def test_llm_stats_count_the_batch(pair):
    plain, batch = pair
    batch.reset_stats()
    results = batch.generate_batch(prompts(plain.info.n_vocab, 4, seed=5), max_tokens=30, draft=3)
    stats = batch.stats
    assert stats.n_generated == sum(len(r.tokens) for r in results)
    assert stats.drafted == sum(r.stats.drafted for r in results) > 0
    assert stats.tokens_per_second > 0


def test_bad_input_is_refused_before_anything_runs(pair):
    plain, batch = pair
    good = prompts(plain.info.n_vocab, 2)
    with pytest.raises(InvalidArgumentError, match="list of prompts"):
        batch.generate_batch("just one text")
    with pytest.raises(InvalidArgumentError, match="list of ints"):
        batch.generate_batch([5, 6, 7])
    with pytest.raises(ContextFullError):
        batch.generate_batch(good + [[1] * (N_CTX + 5)], max_tokens=8)    # longer than the context
    with pytest.raises(InvalidArgumentError):
        batch.generate_batch(good, max_tokens=0)
    with pytest.raises(InvalidArgumentError):
        batch.generate_batch(good, draft=9)
    assert batch.generate_batch([], max_tokens=8) == []
    # nothing ran and nothing was lost: the Llama still works
    assert [r.tokens for r in batch.generate_batch(good, max_tokens=10)] == \
        [plain.generate(p, max_tokens=10).tokens for p in good]


def test_progress_bar_goes_to_stderr(pair, capsys):
    plain, batch = pair
    batch.generate_batch(prompts(plain.info.n_vocab, 3), max_tokens=4, progress=True)
    err = capsys.readouterr().err
    assert "generate_batch" in err and "3/3" in err
    batch.generate_batch(prompts(plain.info.n_vocab, 3), max_tokens=4, progress=False)
    assert "generate_batch" not in capsys.readouterr().err


def test_create_completion_takes_a_list_of_prompts_like_openai(pair):
    plain, batch = pair
    texts = ["one two", "three four five", "six"]
    single = [batch.create_completion(t, max_tokens=12) for t in texts]
    both = batch.create_completion(texts, max_tokens=12)
    assert [c["index"] for c in both["choices"]] == [0, 1, 2]
    assert [c["text"] for c in both["choices"]] == [s["choices"][0]["text"] for s in single]
    assert both["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in single)
    assert both["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in single)
    assert both["usage"]["drafted_tokens"] >= 0 and both["object"] == "text_completion"
    ids = [plain.tokenize(t) for t in texts]
    assert [c["text"] for c in batch.create_completion(ids, max_tokens=12)["choices"]] == \
        [c["text"] for c in both["choices"]]
    # one prompt given as token ids stays one prompt
    assert len(batch.create_completion(ids[1], max_tokens=4)["choices"]) == 1
    with pytest.raises(InvalidArgumentError, match="stream"):
        batch.create_completion(texts, max_tokens=4, stream=True)
