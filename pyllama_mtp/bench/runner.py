"""Runs bench tests the way llama-bench does: random prompt token ids from a seed,
EOS ignored, one warm-up, tokenization outside the timings. Generation tests time
whole decode steps (plain or MTP draft/verify cycles) including greedy sampling,
which the speculative loop needs to decide acceptance.

Unlike llama-bench, the tests of one model take turns: every test's warm-up, then
rounds of one repetition of each (each round starting at the next test), on the same
random tokens within a round. A shared machine drifts by 5-10% over minutes; run one
test after another, that drift lands between the draft lengths a sweep compares."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from ..config import MAX_DRAFT, ContextConfig, ModelConfig, SamplingParams
from ..engine import Model, Session, build_info
from ..draft_policy import BatchDraftPolicy
from ..exactness import ExactnessCheck, check_session
from ..options import PreparedCall
from ..sequence import Sequence, step_sequences
from .params import Instance, BenchTest


@dataclass
class Measurement:
    instance: Instance
    test: BenchTest
    samples_ns: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    n_steps: int = 0
    drafted_at: list[int] = field(default_factory=lambda: [0] * MAX_DRAFT)
    accepted_at: list[int] = field(default_factory=lambda: [0] * MAX_DRAFT)

    @property
    def n_tokens(self) -> int:
        return self.test.n_prompt + self.test.n_gen

    @property
    def samples_ts(self) -> list[float]:
        return [self.n_tokens * 1e9 / ns for ns in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        return statistics.fmean(self.samples_ts) if self.samples_ns else 0.0

    @property
    def stddev_ts(self) -> float:
        return statistics.stdev(self.samples_ts) if len(self.samples_ns) > 1 else 0.0

    @property
    def accept_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def accept_rate_per_pos(self) -> list[float]:
        return [a / d for a, d in zip(self.accepted_at, self.drafted_at) if d]

    @property
    def mean_accept_len(self) -> float | None:
        return self.accepted / self.n_steps if self.n_steps else None


class InstanceRunner:
    """One loaded model and session for an Instance; runs its tests."""

    def __init__(self, path: str, instance: Instance, n_ctx: int, draft_max: int, seed: int):
        self.instance = instance
        has_mtp = draft_max > 0
        self.model = Model(ModelConfig(path, n_gpu_layers=instance.n_gpu_layers, load_mtp=has_mtp))
        self.session = Session(self.model, ContextConfig(
            n_ctx=n_ctx, n_batch=instance.n_batch, n_ubatch=instance.n_ubatch, threads=instance.threads,
            type_k=instance.type_k, type_v=instance.type_v,
            flash_attn=None if instance.flash_attn < 0 else bool(instance.flash_attn), draft_max=draft_max))
        self.seed = seed
        self.n_vocab = self.model.info.n_vocab
        self.exactness: ExactnessCheck | None = None

    def check_exactness(self) -> ExactnessCheck | None:
        """The load-time check a Llama runs (None without MTP): the bench times a device
        that fails it, but says so. Like a Llama's, each "auto" test's policy starts from
        what it measured."""
        if not self.session.draft_max:
            return None
        self.exactness = check_session(self.session)
        return self.exactness

    def close(self) -> None:
        self.session.close()
        self.model.close()

    def _run_once(self, test: BenchTest, m: Measurement | None, sampling: SamplingParams,
                  policy: BatchDraftPolicy | None, round_: int) -> int:
        """One repetition; its nanoseconds (a tg test's decode only, a pp test's prefill).
        Its random tokens come from the seed and ``round_`` alone: the context and the
        prompt each from a stream of its own, so the tests of a round share them as far as
        their lengths allow."""
        s = self.session
        def tokens(stream: int, n: int) -> list[int]:
            return np.random.default_rng([self.seed, round_ + 1, stream]).integers(0, self.n_vocab, size=n).tolist()
        depth = tokens(0, test.n_depth) if test.n_depth else []
        prompt = tokens(1, max(test.n_prompt, 1))
        # one sequence through the library's driver, without text: EOS does not end it
        seq = Sequence(0, PreparedCall(depth + prompt, test.n_gen or None, sampling, test.n_draft, ()), output=None)
        seq.load(s)                                  # held nothing: the slot starts afresh
        if depth:
            seq.prefill(s, limit=len(depth))
        t0 = time.perf_counter_ns()
        seq.prefill(s)
        if test.n_gen:
            if not test.n_prompt:
                t0 = time.perf_counter_ns()          # a tg test times decoding only
            seq.begin(s)
            while seq.n_generated < test.n_gen:
                step_sequences(s, [seq], policy)
        elapsed = time.perf_counter_ns() - t0
        if m is not None:
            c = seq.counters
            m.drafted += c.drafted
            m.accepted += c.accepted
            m.n_steps += c.n_steps
            for i in range(MAX_DRAFT):
                m.drafted_at[i] += c.drafted_at[i]
                m.accepted_at[i] += c.accepted_at[i]
        return elapsed

    def run(self, tests: list[BenchTest], repetitions: int, sampling: SamplingParams,
            progress=lambda round_, test: None) -> list[Measurement]:
        """Every test's warm-up, then ``repetitions`` rounds of one repetition of each, each
        round starting at the next test, its tests on the round's random tokens (see the
        module's docstring and ``_run_once``); a Measurement per test, in the order of ``tests``.
        ``progress(round, test)`` is told before each (round -1: the warm-ups)."""
        out = [Measurement(self.instance, t) for t in tests]
        # draft="auto" learns across the warm-up and the repetitions, as it does across the
        # calls of one Llama: one policy per auto test, seeded by the load-time check
        policies = [BatchDraftPolicy(self.session.draft_max) if t.n_draft == "auto" else None for t in tests]
        for p in policies:
            if p is not None and self.exactness is not None:
                p.seed(self.exactness.seed)
        for r in range(-1, repetitions):
            order = range(len(tests)) if r < 0 else [(r + i) % len(tests) for i in range(len(tests))]
            for i in order:
                progress(r, tests[i])
                ns = self._run_once(tests[i], out[i] if r >= 0 else None, sampling, policies[i], r)
                if r >= 0:
                    out[i].samples_ns.append(ns)
        return out


def environment() -> dict:
    info = build_info()
    return {
        "build_commit": info.get("llama_cpp_commit", ""),
        "cpu_info": info.get("system_info", ""),
        "backends": ",".join(b for b in info.get("backends", [])),
        "gpu_info": ",".join(d["description"] for d in info.get("devices", []) if d["name"] != "CPU"),
    }
