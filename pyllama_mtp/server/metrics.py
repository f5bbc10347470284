"""Prometheus text exposition for the server: request counters, token counters,
latency histograms, and speculative-decoding counters named like vLLM's
(num_drafts, num_draft_tokens, num_accepted_tokens, accepted tokens per position)."""
from __future__ import annotations

import threading
from collections import defaultdict

from ..config import MAX_DRAFT

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets=_LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.n += 1
        self.total += value
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for upper, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{upper}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out += [f"{name}_sum {self.total}", f"{name}_count {self.n}"]
        return out


class Metrics:
    def __init__(self, model_name: str):
        self.model = model_name
        self._lock = threading.Lock()
        self.requests = defaultdict(int)            # (endpoint, status) -> count
        self.stream_errors = defaultdict(int)       # (endpoint, status) -> streams ended by an error
        self.prompt_tokens = 0
        self.prompt_tokens_cached = 0               # prompt tokens a slot's KV cache already held
        self.generation_tokens = 0
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos: list[int] = [0] * MAX_DRAFT
        self.request_latency = Histogram()
        self.time_to_first_token = Histogram()
        self.running = 0                            # sequences being decoded now
        self.waiting = 0                            # requests queued for a free slot

    def set_load(self, running: int, waiting: int) -> None:
        with self._lock:
            self.running, self.waiting = running, waiting

    def prompt_reused(self, n_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens_cached += n_tokens

    def request_done(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def stream_error(self, endpoint: str, status: int) -> None:
        """A stream that had started (status 200) and ended with an error event instead."""
        with self._lock:
            self.stream_errors[(endpoint, status)] += 1

    def generation_done(self, stats, latency_s: float, ttft_s: float | None) -> None:
        with self._lock:
            self.prompt_tokens += stats.n_prompt_tokens
            self.generation_tokens += stats.n_generated
            self.num_drafts += stats.n_steps
            self.num_draft_tokens += stats.drafted
            self.num_accepted_tokens += stats.accepted
            for i, a in enumerate(stats.accepted_per_position[:8]):
                self.accepted_per_pos[i] += a
            self.request_latency.observe(latency_s)
            if ttft_s is not None:
                self.time_to_first_token.observe(ttft_s)

    def render(self) -> str:
        p = "pyllama_mtp"
        with self._lock:
            lines = [f"# TYPE {p}_requests_total counter"]
            lines += [f'{p}_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            lines.append(f"# TYPE {p}_stream_errors_total counter")
            lines += [f'{p}_stream_errors_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.stream_errors.items())]
            for name, value in (("prompt_tokens_total", self.prompt_tokens),
                                ("prompt_tokens_cached_total", self.prompt_tokens_cached),
                                ("generation_tokens_total", self.generation_tokens),
                                ("spec_decode_num_drafts_total", self.num_drafts),
                                ("spec_decode_num_draft_tokens_total", self.num_draft_tokens),
                                ("spec_decode_num_accepted_tokens_total", self.num_accepted_tokens)):
                lines += [f"# TYPE {p}_{name} counter", f'{p}_{name}{{model="{self.model}"}} {value}']
            for name, value in (("num_requests_running", self.running), ("num_requests_waiting", self.waiting)):
                lines += [f"# TYPE {p}_{name} gauge", f'{p}_{name}{{model="{self.model}"}} {value}']
            lines.append(f"# TYPE {p}_spec_decode_num_accepted_tokens_per_pos_total counter")
            lines += [f'{p}_spec_decode_num_accepted_tokens_per_pos_total{{model="{self.model}",position="{i}"}} {n}'
                      for i, n in enumerate(self.accepted_per_pos)]
            lines.append(f"# TYPE {p}_request_latency_seconds histogram")
            lines += self.request_latency.lines(f"{p}_request_latency_seconds")
            lines.append(f"# TYPE {p}_time_to_first_token_seconds histogram")
            lines += self.time_to_first_token.lines(f"{p}_time_to_first_token_seconds")
        return "\n".join(lines) + "\n"
