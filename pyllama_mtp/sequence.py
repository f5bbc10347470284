"""One driver for every loop that generates: ``Llama.generate``/``stream``/``chat`` (one
sequence), ``Llama.generate_batch`` and the server's scheduler (many), the bench (one).

- ``Sequence``: one prompt decoding in one sequence slot of a Session: its tokens (the
  slot's KV cache holds a prefix of them), the reuse of what the slot already held, its
  output (text decoded across token boundaries, stop strings, finish reason), its draft
  counters and its timings.
- ``Slots``: a Session's slots, which are free and what each free one still holds, so a
  new prompt goes where the longest prefix of it already is.
- ``step_sequences``: one decode cycle of a set of sequences through one ``step_batch``
  (the MTP heads draft for all in one decode per head, the target verifies all in one
  batch), with the draft policy picking ``"auto"`` sequences' length.

Each sequence's greedy output equals its output alone, bit for bit: the batch-invariant
kernels give every row the bits it gets alone.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from .draft_policy import HEADS_WINDOW
from .draft_trace import step_record
from .engine import StepResult
from .errors import PmtpError
from .options import PreparedCall
from .speculative import GenerationStats, SequenceCounters
from .text import StopMatcher, Utf8StreamDecoder


# While a sequence decodes plainly the MTP heads may skip its rows but the newest this many
# (Session.seq_mtp_window): feeding them every row costs a batched decode of the heads per
# n_batch rows (about a tenth of plain decoding on a small trunk with three chained heads)
# for drafts nobody asks for. The newest rows are the context a draft draws on most (the
# target's hidden state, each row's other input, carries the rest), and a switch to
# drafting catches up on at most a quarter more than this many (64-128 of them took
# 0.17-0.31 s on that model at depths 0-2,048: 10-15 plain steps). Under "auto" the policy
# keeps fewer where catching up on them would cost more than a plain step
# (BatchDraftPolicy.heads_window), since each of its probes from plain decoding pays it.
PLAIN_HEADS_WINDOW = HEADS_WINDOW


@dataclass(frozen=True)
class Chunk:
    """What one decode step added to a stream."""
    text: str
    tokens: tuple[int, ...]
    from_draft: tuple[bool, ...]    # per token: an MTP draft the target accepted
    finish_reason: str | None = None
    logprobs: tuple[float, ...] | None = None          # per token (when asked)
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: tuple[int, ...]
    finish_reason: str              # "stop" (EOS or stop string) or "length"
    n_prompt_tokens: int
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None


class ChunkCollector:
    """Chunks -> one completion's text, tokens, logprobs and finish reason (a Sequence's
    own output, and the server's answer to a request that does not stream)."""

    def __init__(self):
        self.texts: list[str] = []
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list = []
        self.finish_reason: str | None = None

    def add(self, chunk: Chunk) -> None:
        self.texts.append(chunk.text)
        self.tokens.extend(chunk.tokens)
        self.logprobs.extend(chunk.logprobs or ())
        self.top_logprobs.extend(chunk.top_logprobs or ())
        self.finish_reason = chunk.finish_reason or self.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def completion(self, n_prompt: int, stats: GenerationStats, with_logprobs: bool) -> Completion:
        return Completion(self.text, tuple(self.tokens), self.finish_reason or "length", n_prompt, stats,
                          tuple(self.logprobs) if with_logprobs else None,
                          tuple(self.top_logprobs) if with_logprobs else None)


def _first(step: StepResult, n: int) -> StepResult:
    """The step's first n tokens (the rest fall after EOG or the token limit)."""
    if n == len(step.tokens):
        return step
    return dataclasses.replace(
        step, tokens=step.tokens[:n], from_draft=step.from_draft[:n],
        logprobs=None if step.logprobs is None else step.logprobs[:n],
        top_logprobs=None if step.top_logprobs is None else step.top_logprobs[:n])


class SequenceOutput:
    """One sequence's step results -> Chunks: cuts at end-of-generation, max_tokens and
    the context end (the chunk that ends it carries the finish reason), decodes UTF-8
    across token boundaries and holds back text that a stop string may be starting."""

    def __init__(self, pieces: list[bytes], eog: frozenset[int], max_tokens: int | None, n_ctx: int, stops):
        self.pieces, self.eog, self.n_ctx = pieces, eog, n_ctx
        self.left = max_tokens if max_tokens is not None else n_ctx
        self.decoder = Utf8StreamDecoder()
        self.matcher = StopMatcher(list(stops))
        self.finish_reason: str | None = None

    def _cut(self, step: StepResult, n_past: int) -> tuple[int, str | None]:
        n = 0
        for tok in step.tokens:
            if tok in self.eog:
                return n, "stop"
            n += 1
            self.left -= 1
            if self.left == 0:
                return n, "length"
        return n, ("length" if n_past >= self.n_ctx else None)

    def push(self, step: StepResult, n_past: int) -> Chunk:
        """The chunk for one step; ``n_past``: tokens in the sequence's KV cache after it."""
        n, finish = self._cut(step, n_past)
        step = _first(step, n)
        text = self.decoder.feed(b"".join(self.pieces[t] for t in step.tokens))
        safe, stopped = self.matcher.feed(text)
        if not stopped and finish is not None:
            tail, stopped = self.matcher.feed(self.decoder.flush())
            safe += tail if stopped else tail + self.matcher.flush()
        if stopped:
            finish = "stop"
        self.finish_reason = finish
        return Chunk(safe, step.tokens, step.from_draft, finish, step.logprobs, step.top_logprobs)


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Sequence:
    """One prompt decoding in slot ``seq`` of a Session, whichever loop runs it.

    The life of one: ``load`` (sampler set, the prefix the slot held kept), ``prefill``
    (all of the prompt, or chunk by chunk), ``begin`` (the first token), then
    ``step_sequences`` with others until ``done``; ``cached()`` is what the slot's KV
    cache holds after it. ``output`` None: tokens only, no text and no end at EOG (the
    bench, as llama-bench does)."""

    def __init__(self, seq: int, call: PreparedCall, output: SequenceOutput | None, held: list[int] = ()):
        self.seq = seq
        self.held = held                  # what the slot's KV cache holds before this sequence
        self.call = call
        self.draft = call.draft
        self.output = output
        self.n_prompt = len(call.tokens)
        self.tokens = list(call.tokens)   # the prompt, then every token the steps produced
        self.in_cache = 0                 # prompt tokens prefilled so far (reused ones included)
        self.reused = 0                   # prompt tokens the slot's KV cache already held
        self.last_k = 0                   # drafts of its last step (0: the heads may have rows queued)
        self.fresh = True                 # no step ran since the prompt went in
        self.held_plain = False           # decodes plainly while its batch drafts (see _admit_newcomers)
        self.heads_window: int | None = None   # what the heads may skip (see feed_heads); None: not set
        self.counters = SequenceCounters(rejection=call.rejection)
        self.collected = ChunkCollector()
        self.finish_reason: str | None = None
        self.t_start = time.perf_counter()
        self.t_first: float | None = None
        self.t_end: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilled(self) -> bool:
        return self.in_cache >= self.n_prompt

    def load(self, session) -> None:
        """Set the slot's sampler and keep the longest prefix of the prompt that the slot's
        KV cache holds; the last prompt token is always decoded again, for its logits. A
        cache that cannot roll back (a recurrent model past its snapshots) starts afresh."""
        session.seq_set_sampling(self.seq, self.call.sampling)
        keep = min(common_prefix(self.held, self.call.tokens), self.n_prompt - 1)
        if self.draft not in (0, "auto"):
            # a call that drafts from its first step: its heads take every row, so the
            # rollback decodes the kept tokens they need again; where the slot decoded
            # plainly before (its window set) it would leave them a gap instead, as it does
            # for plain and "auto" calls (a server slot at a busy hour: one row less to decode)
            self.feed_heads(session, 0)
        try:
            if keep == 0:
                session.seq_reset(self.seq)
            elif keep < len(self.held):
                session.seq_rollback(self.seq, keep)
        except PmtpError:
            session.seq_reset(self.seq)
            keep = 0
        self.in_cache = self.reused = keep
        self.feed_heads(session, PLAIN_HEADS_WINDOW if self.draft == 0 else 0)

    def feed_heads(self, session, window: int) -> None:
        """Whether the MTP heads take all of its rows (``window`` 0: it drafts, or may draft
        soon) or may skip all but the newest ``window`` (it decodes plainly). Only drafts
        can change, never the output."""
        if window != self.heads_window:
            if session.config.draft_max > 0:    # (a session without heads has nothing to skip)
                session.seq_mtp_window(self.seq, window)
            self.heads_window = window

    def prefill(self, session, limit: int | None = None) -> bool:
        """Prefill the rest of the prompt (at most ``limit`` tokens of it); True once all of
        it is in."""
        n = self.n_prompt - self.in_cache
        if limit is not None:
            n = min(n, limit)
        session.seq_prefill(self.seq, self.call.tokens[self.in_cache:self.in_cache + n])
        self.in_cache += n
        if self.prefilled and self.draft != 0 and self.n_prompt - self.reused > session.config.n_batch:
            # a prompt long enough that the heads took most of it already (in flushes of
            # n_batch rows): they take its tail now too, as a part of the prompt's cost (at
            # most what they took of it), rather than at a first draft, where under load
            # it may not pay back and "auto" would leave it pending, answer after answer
            session.seq_mtp_catch_up(self.seq)
        return self.prefilled

    def begin(self, session) -> Chunk | None:
        """Sample the first token; call it right after the prompt's last prefill (a decode of
        any other sequence overwrites the logits it samples from)."""
        chunk = self.take(session.seq_sample(self.seq), session.seq_n_past(self.seq))
        self.t_first = time.perf_counter()
        return chunk

    def stepped(self, session, k: int, result: StepResult) -> Chunk | None:
        """A decode cycle of ``k`` drafts gave it ``result``: counted, and its chunk."""
        self.last_k, self.fresh = k, False
        self.counters.count(result)
        return self.take(result, session.seq_n_past(self.seq))

    def take(self, result: StepResult, n_past: int) -> Chunk | None:
        """One step's tokens; the chunk a stream gets (None without an output)."""
        self.tokens.extend(result.tokens)
        if self.output is None:
            return None
        chunk = self.output.push(result, n_past)
        self.collected.add(chunk)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.t_end = time.perf_counter()
        return chunk

    def end(self, reason: str) -> None:
        """Stop here (the consumer stopped reading, or the bench has its tokens)."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self.t_end = time.perf_counter()

    def cached(self, n_past: int) -> list[int]:
        """The tokens in the slot's KV cache, given how many it holds: every token but the
        newest one of each step is decoded."""
        return self.tokens[:n_past]

    @property
    def tokens_left(self) -> int | None:
        """Tokens it may still generate before max_tokens (None: no limit)."""
        if self.call.max_tokens is None:
            return None
        return max(self.call.max_tokens - self.n_generated, 0)

    @property
    def n_generated(self) -> int:
        return len(self.collected.tokens) if self.output is not None else len(self.tokens) - self.n_prompt

    def stats(self) -> GenerationStats:
        """Its draft counters, prompt/generation wall times and prompt tokens reused."""
        now = time.perf_counter()
        t_first = self.t_first if self.t_first is not None else now
        t_end = self.t_end if self.t_end is not None else now
        return self.counters.stats(n_prompt_tokens=self.n_prompt, n_generated=self.n_generated,
                                   t_prompt_s=t_first - self.t_start, t_generate_s=t_end - t_first,
                                   extra={"prompt_tokens_reused": self.reused})

    def completion(self, stats: GenerationStats | None = None) -> Completion:
        return self.collected.completion(self.n_prompt, stats or self.stats(), self.call.with_logprobs)


class Slots:
    """The sequence slots of one Session: which are free, and what each free slot's KV cache
    still holds. A new prompt goes to the free slot holding the longest common prefix of it
    and prefills only the rest, when that prefix is at least ``min_reuse`` tokens; else it
    goes to the lowest free id (which keeps active ids consecutive and batches large) and
    starts afresh."""

    def __init__(self, n: int, min_reuse: int = 16):
        self.n = n
        self.min_reuse = min_reuse
        self.free = list(range(n))
        self.held: dict[int, list[int]] = {}      # slot -> the tokens its KV cache holds

    def take(self, tokens: list[int]) -> tuple[int, list[int]]:
        """A free slot for a prompt, and what of its KV cache to reuse ([]: start it afresh;
        a prefix shorter than ``min_reuse`` is not worth a rollback)."""
        best = max(self.free, key=lambda s: (common_prefix(self.held.get(s, ()), tokens), -s))
        held = self.held.pop(best, [])
        if common_prefix(held, tokens) < self.min_reuse:
            self.held[best] = held
            best = min(self.free)
            held = []
            self.held.pop(best, None)
        self.free.remove(best)
        return best, held

    def give_back(self, seq: int, holds: list[int]) -> None:
        """A slot is free again; its KV cache holds ``holds`` ([] after a reset)."""
        self.held[seq] = holds
        self.free.append(seq)

    def forget(self) -> None:
        """The KV caches were cleared outside: no slot holds anything."""
        self.held.clear()


def _admit_newcomers(session, policy, p, k: int, auto: list[Sequence], n_running: int,
                     queued: dict[int, int]) -> int:
    """Before a step whose "auto" sequences draft k: whether each newcomer among them (one
    that joins a batch, or one held back before) drafts too, or decodes plainly meanwhile
    (``Sequence.held_plain``). Its heads must first take the rows they lack (a prompt's
    rows: a second or more for a few hundred at a long context), which pays only if
    drafting saves as much over the tokens it has left (``BatchDraftPolicy.admits``); the
    other sequences need not wait for that. Returns the step's length: 0 where every "auto"
    sequence is held, where a probe from plain decoding would run beside held ones (it
    waits until they are gone), or where the batch's size class has no plain step timed
    yet (held ones wait for its figure)."""
    for s in auto:
        if s.held_plain or (s.fresh and n_running > 1):
            rows = queued[s.seq] = session.seq_mtp_queued(s.seq)
            s.held_plain = not policy.admits(p, k, rows, s.tokens_left)
    if policy.holds_off(p, sum(s.held_plain for s in auto), len(auto)):
        return policy.hold_off()
    return k


def _coast_alone(session, s: Sequence, policy) -> Chunk | None | bool:
    """The step of one "auto" sequence alone while its policy coasts on plain decoding
    (``BatchDraftPolicy.coast_alone``: nothing to decide, time or trace), by the shortest
    path; False where the step is not such a step (``step_sequences`` takes it). On a tiny
    model a plain step takes ~0.13 ms, and the general path's bookkeeping cost settled
    plain decoding 1.3% there (a policy made to coast forever against draft=0 in one
    session: 0.987x; by this path 1.01x, within noise)."""
    if s.draft != "auto" or s.fresh or s.held_plain or not policy.coast_alone():
        return False
    s.feed_heads(session, policy.plain_window)
    res, = session.step_batch([s.seq], [0])
    return s.stepped(session, 0, res)


def step_sequences(session, running: list[Sequence], policy) -> list[Chunk | None]:
    """One decode cycle for ``running`` (each prefilled and begun): each takes its own
    draft setting; ``"auto"`` ones take the length ``policy`` (a BatchDraftPolicy) picks
    for this many sequences (their size class) at the deepest context among them, and the
    policy learns from the step's time and acceptance. Returns each sequence's chunk."""
    if policy is not None and len(running) == 1:
        chunk = _coast_alone(session, running[0], policy)
        if chunk is not False:
            return [chunk]
    auto = [s for s in running if s.draft == "auto"] if policy is not None else []
    p = policy.enter(len(running)) if auto else None
    k_auto, timed, depth, decided = 0, False, 0, False
    queued: dict[int, int] = {}      # rows the heads lack, of the sequences that would switch in
    if p is not None:
        if len(running) == 1 and running[0].fresh:
            # a generation begins: the prefill ran graphs of its own, so this step is not
            # steady. Not so for a batch that a sequence joins: arrivals come every few
            # steps under load, and counting their steps as switches would make the
            # switch cost look high and hold the policy to its length.
            p.start_sequence(session.seq_n_past(running[0].seq))
        if not p.coast_step():       # (plain steps the policy need not see: a tiny model's step
                                     # takes ~0.1 ms, bookkeeping would show)
            decided = True
            depth = max(session.seq_n_past(s.seq) for s in auto)
            # what switching to drafting would cost first: the rows the heads lack of each
            # sequence that decoded plainly (alone: or was just prefilled), and how many
            # tokens those sequences have left to win it back (a newcomer to a batch is
            # priced apart, see below)
            switching = [s for s in auto
                         if s.last_k == 0 and not s.held_plain and not (s.fresh and len(running) > 1)]
            queued = {s.seq: session.seq_mtp_queued(s.seq) for s in switching}
            k_auto = policy.decide(p, depth, [(queued[s.seq], s.tokens_left) for s in switching])
            if k_auto > 0:
                k_auto = _admit_newcomers(session, policy, p, k_auto, auto, len(running), queued)
            if k_auto == 0:
                policy.plain_window = policy.heads_window(p, len(running))
            timed = p.timed
    drafts = [(0 if s.held_plain else k_auto) if s.draft == "auto" else s.draft for s in running]
    auto_window = policy.plain_window if auto else PLAIN_HEADS_WINDOW
    for s, k in zip(running, drafts):
        s.feed_heads(session, 0 if k else auto_window if s.draft == "auto" else PLAIN_HEADS_WINDOW)
    held = sum(s.held_plain for s in auto) if k_auto > 0 else 0
    catch_up = joined = 0.0
    rows_caught = [0, 0]             # rows the heads took before the step: switching, joining
    if timed:
        # rows queued by plain decoding go to the heads outside the timed step (a draft
        # would take them itself, but then its time would not be a drafting step's): the
        # price of switching to drafting, which the policy counts as such. Not so for a
        # sequence that joins a batch: its prompt's rows reach the heads only because the
        # batch drafts (plain decoding drops them with the sequence), and on a busy server
        # one joins every few steps, so that is part of what drafting costs there: the
        # policy takes it apart from the step's time (``joined``) and spreads it over
        # drafting steps
        for s, k in zip(running, drafts):
            if k > 0 and s.last_k == 0:
                rows = queued[s.seq] if s.seq in queued else session.seq_mtp_queued(s.seq)
                t0 = time.perf_counter()
                session.seq_mtp_catch_up(s.seq)
                dt = time.perf_counter() - t0
                policy.observe_catch_up(depth, rows, dt)
                if s.fresh and len(running) > 1:
                    joined += dt
                    rows_caught[1] += rows
                else:
                    catch_up += dt
                    rows_caught[0] += rows
    builds = session.graph_builds if timed else 0
    t0 = time.perf_counter()
    results = session.step_batch([s.seq for s in running], drafts)
    seconds = time.perf_counter() - t0
    if timed or (p is not None and policy.trace is not None):      # (not on a coasting step's hot path)
        accepted = [res.n_accepted for s, res in zip(running, results) if s.draft == "auto" and not s.held_plain]
    if timed:
        policy.update(len(running), k_auto, accepted, seconds, depth, catch_up,
                      members=tuple(s.seq for s in running),
                      arrivals=len(running) > 1 and any(s.fresh for s in running), joined=joined,
                      drafting=len(running) - held if held else None,
                      rebuilt=session.graph_builds != builds)
    if decided:
        # plain steps to come with nothing to decide: set after the step, so that one the
        # policy timed (a recheck, a generation's first) is not followed by another decision
        p.coast = p.coast_budget(depth + 1)
    if p is not None and policy.trace is not None:
        if not timed:                # a coasting step did not look up the depth
            depth = max(session.seq_n_past(s.seq) for s in auto) - 1
        policy.trace.write(step_record(
            policy, len(running), k_auto, seconds, depth, timed, accepted, catch_up, joined,
            policy.last_same_batch if timed else None, rows_caught, held))
    return [s.stepped(session, k, res) for s, k, res in zip(running, drafts, results)]
