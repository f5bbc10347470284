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
from ..draft_policy import DraftPolicy, step_auto
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
        self.policy: DraftPolicy | None = None
        self.n_vocab = self.model.info.n_vocab

    def close(self) -> None:
        self.session.close()
        self.model.close()

    def _random_tokens(self, n: int) -> list[int]:
        return self.rng.integers(0, self.n_vocab, size=n).tolist()

    def _run_once(self, test: BenchTest, m: Measurement | None, sampling: SamplingParams) -> int:
        s = self.session
        s.reset()
        s.set_sampling(sampling)
        if test.n_depth:
            s.prefill(self._random_tokens(test.n_depth))
        prompt = self._random_tokens(test.n_prompt) if test.n_prompt else self._random_tokens(1)
        before = s.stats()
        t0 = time.perf_counter_ns()
        if test.n_prompt:
            s.prefill(prompt)
        elif test.n_gen:
            s.prefill(prompt)
            t0 = time.perf_counter_ns()  # a tg test times decoding only
        if test.n_gen:
            s.sample()
            produced = 1
            policy = self.policy if test.n_draft == "auto" else None
            if policy:
                policy.start_sequence()
            while produced < test.n_gen:
                if policy is None:
                    produced += len(s.step(int(test.n_draft)).tokens)
                    continue
                produced += len(step_auto(s, policy)[0].tokens)
        elapsed = time.perf_counter_ns() - t0
        if m is not None:
            after = s.stats()
            m.drafted += after["n_drafted"] - before["n_drafted"]
            m.accepted += after["n_accepted"] - before["n_accepted"]
            m.n_steps += after["n_steps"] - before["n_steps"]
            for i in range(MAX_DRAFT):
                m.drafted_at[i] += after["drafted_at"][i] - before["drafted_at"][i]
                m.accepted_at[i] += after["accepted_at"][i] - before["accepted_at"][i]
        return elapsed

    def run(self, test: BenchTest, repetitions: int, sampling: SamplingParams) -> Measurement:
        m = Measurement(self.instance, test)
        # draft="auto" learns across the warm-up and the repetitions, as it does across the
        # calls of one Llama
        self.policy = DraftPolicy(self.session.draft_max) if test.n_draft == "auto" else None
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
