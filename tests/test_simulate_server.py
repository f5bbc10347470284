"""scripts/simulate_server_auto.py: the server simulation the batch policy is tuned on."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def sim():
    return load_script("simulate_server_auto")


def test_costs_from_a_trace_are_the_steady_steps_medians_with_missing_lengths_on_a_line(sim, tmp_path):
    rows = [dict(n=2, k=0, s=0.012, timed=True, same=True), dict(n=2, k=0, s=0.014, timed=True, same=True),
            dict(n=2, k=0, s=0.090, timed=True, same=False),      # after a change of batch: not steady
            dict(n=2, k=2, s=0.020, timed=True, same=True),
            dict(n=1, k=0, s=0.010, timed=False, same=True)]      # not timed
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = sim.costs_from_trace(trace)
    assert set(table) == {2}
    assert table[2][0] == pytest.approx(13.0) and table[2][2] == pytest.approx(20.0)
    assert table[2][1] == pytest.approx(16.5) and table[2][3] == pytest.approx(23.5)
    t = {1: {0: 10.0}, 4: {0: 16.0}}
    assert sim.step_ms(t, 2, 0) == pytest.approx(12.0) and sim.step_ms(t, 8, 0) == pytest.approx(24.0)


def test_the_simulated_server_ranks_fixed_lengths_by_acceptance(sim):
    kw = dict(clients=2, requests=4, n_gen=64, noise=0.05, drift=0.0)
    def fixed(k, acceptance):
        return sim.run(sim.Fixed(k), sim.TRACED_MS, acceptance=acceptance, rng=np.random.default_rng(k), **kw)[0]
    assert fixed(0, 0.0) > fixed(1, 0.0) > fixed(3, 0.0)        # rejected drafts only cost
    assert fixed(3, 0.9) > 1.3 * fixed(0, 0.9)                  # accepted ones pay


def test_auto_on_the_simulated_server_decodes_plainly_where_drafts_are_rejected(sim):
    import pyllama_mtp.draft_policy as module
    rate, plain_share = sim.run(sim.new_policy(module, [[0, 0], [0]]), sim.TRACED_MS, clients=8, acceptance=0.0,
                                rng=np.random.default_rng(1), requests=4, n_gen=64, noise=0.05, drift=0.0)
    plain = sim.run(sim.Fixed(0), sim.TRACED_MS, clients=8, acceptance=0.0, rng=np.random.default_rng(2),
                    requests=4, n_gen=64, noise=0.05, drift=0.0)[0]
    assert plain_share > 0.9 and rate > 0.95 * plain
