"""Many prompts through one Session at once (``Llama.generate_batch``): offline work such as
evaluations or data generation.

Continuous batching: up to ``n_seq_max`` sequences (``Llama(parallel=N)``) decode together;
every loop steps all of them in one ``step_batch`` call (the MTP heads draft for all of them
in one decode per head and the target verifies all of them in one batch), and a sequence
that finishes frees its slot for the next prompt at once. A new prompt is prefilled whole
between steps. Each sequence's greedy output equals its output alone, bit for bit: the
batch-invariant kernels give every row the bits it gets alone.

``draft="auto"`` takes the length a BatchDraftPolicy picks for the number of sequences in
the step (0 where MTP does not pay at that batch size); a fixed draft is used as given.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field

from .speculative import SequenceCounters

# A progress bar appears on stderr (when it is a terminal) for batches of at least this many prompts.
PROGRESS_MIN_PROMPTS = 8


@dataclass
class _Running:
    """One prompt in a slot: its output so far and its counters."""
    index: int                 # position in the caller's list
    seq: int
    n_prompt: int
    draft: int | str
    output: object             # llama.SequenceOutput
    with_logprobs: bool
    t_start: float
    t_first: float = 0.0
    texts: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    counters: SequenceCounters = field(default_factory=SequenceCounters)
    last_k: int = 0            # drafts of its last step (0: the heads may have rows queued)

    def take(self, chunk) -> bool:
        """Add one chunk; True when the sequence is done."""
        self.texts.append(chunk.text)
        self.tokens.extend(chunk.tokens)
        self.logprobs.extend(chunk.logprobs or ())
        self.top_logprobs.extend(chunk.top_logprobs or ())
        return chunk.finish_reason is not None


def step_together(session, seqs: list[tuple[int, int | str, int]], policy) -> list[tuple[int, object, int]]:
    """One decode cycle for several sequences: ``seqs`` holds (sequence id, its draft setting
    (an int or "auto"), the drafts of its last step); returns per sequence (drafts used, its
    StepResult, tokens in its KV cache after). ``"auto"`` sequences take the length
    ``policy`` (a BatchDraftPolicy) picks for this many sequences at the deepest context
    among them, and the policy learns from the step's time and acceptance. The loop of
    ``generate_batch`` and the server's scheduler both step their sequences here."""
    ids = [seq for seq, _, _ in seqs]
    auto = [seq for seq, draft, _ in seqs if draft == "auto"]
    depth = max(session.seq_n_past(seq) for seq in auto) if auto else 0
    k_auto = policy.choose(len(ids), depth) if auto and policy else 0
    drafts = [k_auto if draft == "auto" else draft for _, draft, _ in seqs]
    t0 = time.perf_counter()
    for (seq, _, last_k), k in zip(seqs, drafts):
        # rows queued by plain decoding go to the heads outside the timed step
        if k > 0 and last_k == 0:
            session.seq_mtp_catch_up(seq)
    catch_up = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = session.step_batch(ids, drafts)
    seconds = time.perf_counter() - t0
    if auto and policy:
        accepted = [res.n_accepted for (_, draft, _), res in zip(seqs, results) if draft == "auto"]
        policy.update(len(ids), k_auto, accepted, seconds, depth, catch_up)
    return [(k, res, session.seq_n_past(seq)) for seq, k, res in zip(ids, drafts, results)]


def _progress_bar(total: int, progress: bool | None):
    show = progress if progress is not None else (total >= PROGRESS_MIN_PROMPTS and sys.stderr.isatty())
    if not show:
        return None
    from tqdm import tqdm
    return tqdm(total=total, file=sys.stderr, unit="prompt", desc="generate_batch")


def generate_batch(llm, calls: list, progress: bool | None = None) -> list:
    """Run every call (``Llama.prepare``'s PreparedCall) to its end through
    ``llm``'s session; Completions in the order of ``calls``. Runs inside a turn of the
    Llama's gate."""
    from .llama import Completion, SequenceOutput   # llama imports this module

    session, gate = llm.session, llm._gate
    pending = deque(enumerate(calls))
    free = list(range(session.n_seq_max))            # lowest id first: active ids stay consecutive
    running: dict[int, _Running] = {}
    results: list = [None] * len(calls)
    # the Llama's batch policy: what it learns about step costs and acceptance carries over calls
    policy = llm._batch_policy if any(call.draft == "auto" for call in calls) else None
    bar = _progress_bar(len(calls), progress)

    def finish(r: _Running) -> None:
        del running[r.seq]
        free.append(r.seq)
        free.sort()
        t_end = time.perf_counter()
        stats = r.counters.stats(n_prompt_tokens=r.n_prompt, n_generated=len(r.tokens),
                                 t_prompt_s=r.t_first - r.t_start, t_generate_s=t_end - r.t_first)
        results[r.index] = Completion("".join(r.texts), tuple(r.tokens), r.output.finish_reason or "length",
                                      r.n_prompt, stats, tuple(r.logprobs) if r.with_logprobs else None,
                                      tuple(r.top_logprobs) if r.with_logprobs else None)
        if bar is not None:
            bar.update(1)

    def start(index: int, call) -> None:
        seq = free.pop(0)
        r = _Running(index, seq, len(call.tokens), call.draft,
                     SequenceOutput(llm.model.token_pieces, llm.model.eog_tokens, call.max_tokens, llm.n_ctx,
                                    call.stops),
                     call.sampling.n_logprobs >= 0, time.perf_counter())
        running[seq] = r
        with gate.native():
            session.seq_reset(seq)
            session.seq_set_sampling(seq, call.sampling)
            session.seq_prefill(seq, call.tokens)
            first = session.seq_sample(seq)           # right after the prefill: no decode in between
            n_past = session.seq_n_past(seq)
        r.t_first = time.perf_counter()
        if r.take(r.output.push(first, n_past)):
            finish(r)

    def step() -> None:
        seqs = sorted(running)
        with gate.native():
            steps = step_together(session, [(s, running[s].draft, running[s].last_k) for s in seqs], policy)
        for seq, (k, res, past) in zip(seqs, steps):
            r = running[seq]
            r.last_k = k
            r.counters.count(res)
            if r.take(r.output.push(res, past)):
                finish(r)

    try:
        while pending or running:
            while pending and free:
                start(*pending.popleft())
            if running:
                step()
    finally:
        if bar is not None:
            bar.close()
        # the slots' caches no longer hold what the Llama's own calls expect in sequence 0
        llm._kv_tokens = []
        with gate.native():
            for seq in range(session.n_seq_max):
                session.seq_reset(seq)
    return results
