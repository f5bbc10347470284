"""draft='auto': the policy on simulated costs and acceptance, and exactness end to end."""
from __future__ import annotations

import numpy as np

from pyllama_mtp import Llama
from pyllama_mtp.speculative import DraftPolicy


def simulate(policy, accept_rate, step_time, n_steps=400, seed=0):
    """Feed the policy steps from a model with i.i.d. acceptance and fixed costs;
    returns the tokens per second it achieved and the draft lengths it chose."""
    rng = np.random.default_rng(seed)
    tokens = seconds = 0.0
    chosen = []
    for _ in range(n_steps):
        k = policy.choose()
        n_acc = 0
        while n_acc < k and rng.random() < accept_rate:
            n_acc += 1
        policy.update(k, n_acc, step_time(k))
        tokens += n_acc + 1
        seconds += step_time(k)
        chosen.append(k)
    return tokens / seconds, chosen


def best_fixed(accept_rate, step_time, draft_max):
    rates = [sum(accept_rate ** i for i in range(k + 1)) / step_time(k) for k in range(draft_max + 1)]
    return max(rates), int(np.argmax(rates))


def test_high_acceptance_cheap_verify_drafts_the_maximum():
    step_time = lambda k: 1.0 + 0.15 * k
    rate, chosen = simulate(DraftPolicy(3), 0.9, step_time)
    best, k_best = best_fixed(0.9, step_time, 3)
    assert k_best == 3 and chosen[-50:].count(3) > 40
    assert rate > 0.93 * best


def test_low_acceptance_turns_mtp_off_and_keeps_probing():
    step_time = lambda k: 1.0 + 0.5 * k
    policy = DraftPolicy(3, probe_every=16)
    rate, chosen = simulate(policy, 0.1, step_time)
    assert chosen[-100:].count(0) > 95
    assert policy.probes >= 3                          # it keeps checking whether drafts pay again
    assert rate > 0.97 * (1 / step_time(0))           # never more than 3% below MTP off


def test_middle_acceptance_picks_a_middle_length():
    step_time = lambda k: 1.0 + 0.3 * k * k
    best, k_best = best_fixed(0.7, step_time, 3)
    rate, chosen = simulate(DraftPolicy(3), 0.7, step_time, n_steps=600)
    assert k_best == 1 and max(set(chosen[-100:]), key=chosen[-100:].count) == 1
    assert rate > 0.93 * best


def test_auto_draft_is_lossless(step35_path):
    with Llama(step35_path, n_ctx=1024, threads=2) as plain:
        expected = plain.generate([11, 12, 13], max_tokens=200).tokens
    with Llama(step35_path, n_ctx=1024, threads=2, mtp=True, draft="auto") as llm:
        assert llm.draft_max == 3
        assert llm.generate([11, 12, 13], max_tokens=200).tokens == expected


def test_batch_policy_drafts_where_it_pays_and_stops_where_it_does_not():
    """Simulated server steps: one sequence is memory-bound (drafting is nearly free),
    eight sequences are compute-bound (a step costs its rows), so the policy must draft
    3 at batch size 1 and decode plainly at batch size 8, each near the best fixed rate."""
    from pyllama_mtp.speculative import BatchDraftPolicy

    def step_time(n, k):
        return max(0.05, 0.01 * n * (k + 1))

    rng = np.random.default_rng(1)
    policy = BatchDraftPolicy(3)
    chosen = {1: [], 8: []}
    for i in range(800):
        n = 1 if (i // 100) % 2 == 0 else 8           # sizes alternate, as requests come and go
        k = policy.choose(n)
        accepted = []
        for _ in range(n):
            a = 0
            while a < k and rng.random() < 0.8:
                a += 1
            accepted.append(a)
        policy.update(n, k, accepted, step_time(n, k))
        chosen[n].append(k)
    assert np.mean(np.array(chosen[1][-200:]) == 3) > 0.8
    assert np.mean(np.array(chosen[8][-200:]) == 0) > 0.8
