"""Runs bench tests the way llama-bench does: random prompt token ids from a seed,
EOS ignored, one warm-up, tokenization outside the timings. Generation tests time
whole decode steps (plain or MTP draft/verify cycles) including greedy sampling,
which the speculative loop needs to decide acceptance."""
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
        self.rng = np.random.default_rng(seed)
        self.policy: BatchDraftPolicy | None = None
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

    def _random_tokens(self, n: int) -> list[int]:
        return self.rng.integers(0, self.n_vocab, size=n).tolist()

    def _run_once(self, test: BenchTest, m: Measurement | None, sampling: SamplingParams) -> int:
        """One repetition; its nanoseconds (a tg test's decode only, a pp test's prefill)."""
        s = self.session
        depth = self._random_tokens(test.n_depth) if test.n_depth else []
        prompt = self._random_tokens(max(test.n_prompt, 1))
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
                step_sequences(s, [seq], self.policy)
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

    def run(self, test: BenchTest, repetitions: int, sampling: SamplingParams) -> Measurement:
        m = Measurement(self.instance, test)
        # draft="auto" learns across the warm-up and the repetitions, as it does across the
        # calls of one Llama
        self.policy = BatchDraftPolicy(self.session.draft_max) if test.n_draft == "auto" else None
        if self.policy is not None and self.exactness is not None:
            self.policy.seed(self.exactness.seed)
        self._run_once(test, None, sampling)  # warm-up
        for _ in range(repetitions):
            m.samples_ns.append(self._run_once(test, m, sampling))
        return m


def environment() -> dict:
    info = build_info()
    return {
        "build_commit": info.get("llama_cpp_commit", ""),
        "cpu_info": info.get("system_info", ""),
        "backends": ",".join(b for b in info.get("backends", [])),
        "gpu_info": ",".join(d["description"] for d in info.get("devices", []) if d["name"] != "CPU"),
    }
