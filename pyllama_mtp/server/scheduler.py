"""Continuous batching for ``--parallel N``: one thread owns the session and its N
sequence slots; HTTP handlers only enqueue jobs and read results.

Every loop the scheduler frees the slots of cancelled jobs (clients that went away),
admits queued jobs into free slots, prefills one chunk of a waiting prompt, then steps
every active slot together in one ``step_batch`` call: the MTP heads draft for all
slots in one decode per head and the target verifies all of them in one batch. Each
slot's chunks go to its own job as soon as the step returns; a finished slot is free
for the next queued job in the same loop. Jobs beyond N wait in the queue.

Prompts: while other slots generate, a new prompt is prefilled ``prefill_chunk`` tokens
per loop, so the running streams pause for one chunk at a time, not for the whole
prompt; with nothing else running it goes in at once. A finished slot keeps its tokens
in the KV cache: a new prompt goes to the free slot holding the longest common prefix
(at least ``min_reuse`` tokens; else the lowest free id, which keeps active ids
consecutive and batches large) and prefills only the rest, as a chat's next turn does.

A slot with ``draft="auto"`` takes the draft length a BatchDraftPolicy picks for the
number of slots in the step (0 when MTP does not pay at that batch size); a fixed draft
(or ``mtp: false``) is used as given.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from ..llama import Llama, SequenceOutput
from ..batch import step_together
from ..draft_policy import BatchDraftPolicy
from ..speculative import GenerationStats, SequenceCounters
from .worker import Job, Worker, refuse_queued

_DONE = Worker.DONE   # the app ends a request's stream on this, whichever worker serves it


@dataclass
class _Slot:
    """One sequence slot and the job it serves."""
    seq: int
    job: Job
    output: SequenceOutput
    draft: int | str
    n_prompt: int
    t_first: float
    reused: int = 0           # prompt tokens found in the slot's KV cache
    n_generated: int = 0
    counters: SequenceCounters = field(default_factory=SequenceCounters)
    tokens: list[int] = field(default_factory=list)   # prompt, then every token generated
    last_k: int = 0           # drafts of its last step (0: the heads may have rows queued)

    def stats(self) -> GenerationStats:
        return self.counters.stats(n_prompt_tokens=self.n_prompt, n_generated=self.n_generated,
                                   extra={"prompt_tokens_reused": self.reused})


@dataclass
class _Prefill:
    """A job holding a slot while its prompt goes in, chunk by chunk."""
    seq: int
    job: Job
    tokens: list[int]          # the whole prompt
    done: int                  # tokens of it already in the slot's KV cache
    max_tokens: int
    draft: int | str
    stops: object
    reused: int = 0            # of them, tokens the slot's KV cache already held


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class BatchWorker:
    DONE = _DONE

    def __init__(self, llm: Llama, metrics, prefill_chunk: int = 128, min_reuse: int = 16):
        self.llm = llm
        self.session = llm.session
        self.metrics = metrics
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.free = list(range(self.session.n_seq_max))     # lowest id first: active ids stay consecutive
        self.slots: dict[int, _Slot] = {}
        self.prefilling: list[_Prefill] = []                # admitted, prompt not fully in yet (FIFO)
        self.cached: dict[int, list[int]] = {}              # free slot -> tokens its KV cache holds
        self.prefill_chunk = max(1, prefill_chunk)
        self.min_reuse = min_reuse
        self.policy = BatchDraftPolicy(llm.draft_max) if llm.draft_max else None
        self.stopping = False
        self.draining = False     # set on SIGTERM: nothing new is admitted
        self.shutdown_at: float | None = None   # time.monotonic() by which running requests end
        self.thread = threading.Thread(target=self._run, name="pyllama-mtp-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)
        if self.draining:
            refuse_queued(self.jobs)
        self._report()

    def queued(self) -> int:
        """Requests waiting for a slot (not counting prompts going in)."""
        return self.jobs.qsize()

    def drain(self, grace_s: float | None = None) -> None:
        """Shutdown has begun: refuse what waits; the admitted requests may go on for
        ``grace_s`` seconds (the app then ends them with ShuttingDown)."""
        if grace_s is not None and self.shutdown_at is None:
            self.shutdown_at = time.monotonic() + grace_s
        self.draining = True
        refuse_queued(self.jobs)
        self._report()

    def stop(self) -> None:
        self.drain()
        self.stopping = True      # seen between steps even while every slot is busy
        self.jobs.put(None)       # wakes a scheduler waiting for work
        self.thread.join(timeout=30)

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        while not self.stopping:
            self._drop_cancelled()
            if self.draining and not self.slots and not self.prefilling:
                time.sleep(0.05)   # nothing left to run: wait for stop()
                continue
            self._admit(block=not self.slots and not self.prefilling)
            if self.prefilling:
                self._prefill_chunk()
            if self.slots:
                self._step()
        for p in list(self.prefilling):
            self._abandon(p, error=None)
        for seq in list(self.slots):
            self._finish(seq, error=None)

    def _admit(self, block: bool) -> None:
        while self.free and not self.stopping and not self.draining:
            try:
                job = self.jobs.get(timeout=0.5) if block else self.jobs.get_nowait()
            except queue.Empty:
                return
            block = False
            if job is None:
                self.stopping = True
                return
            if job.cancelled.is_set():
                job.emit(_DONE)
                continue
            self._start(job)
        self._report()

    def _pick_slot(self, tokens: list[int]) -> tuple[int, int]:
        """(free slot, prompt tokens its cache already holds) for a new prompt."""
        best, common = min(self.free), 0
        for seq in self.free:
            n = _common_prefix(self.cached.get(seq, []), tokens)
            if n > common or (n == common and seq < best):
                best, common = seq, n
        if common < self.min_reuse:
            best, common = min(self.free), 0
        return best, min(common, len(tokens) - 1)   # the last prompt token is decoded for its logits

    def _start(self, job: Job) -> None:
        llm, session = self.llm, self.session
        try:
            opts = dict(job.options)
            call = llm.prepare(job.tokens, opts.pop("max_tokens"), **opts)
        except Exception as e:   # reported to its request; the other slots go on
            job.emit(e)
            job.emit(_DONE)
            return
        tokens = call.tokens
        seq, keep = self._pick_slot(tokens)
        self.free.remove(seq)
        cached = self.cached.pop(seq, [])
        try:
            session.seq_set_sampling(seq, call.sampling)
            if keep > 0 and keep < len(cached):
                session.seq_rollback(seq, keep)
            elif keep == 0 and cached:
                session.seq_reset(seq)
        except Exception:        # a rollback the state cannot serve: start the slot afresh
            session.seq_reset(seq)
            keep = 0
        self.metrics.prompt_reused(keep)
        self.prefilling.append(_Prefill(seq, job, tokens, keep, call.max_tokens, call.draft, call.stops, reused=keep))

    def _prefill_chunk(self) -> None:
        """Prefill the oldest waiting prompt: all of it when no slot is generating, else one
        chunk; once it is in, sample its first token and make the slot active."""
        p = self.prefilling[0]
        rest = len(p.tokens) - p.done
        n = rest if not self.slots else min(rest, self.prefill_chunk)
        try:
            self.session.seq_prefill(p.seq, p.tokens[p.done:p.done + n])
            p.done += n
            if p.done < len(p.tokens):
                return
            first = self.session.seq_sample(p.seq)   # right after the prefill: no decode in between
        except Exception as e:   # reported to its request; the other slots go on
            self._abandon(p, error=e)
            return
        self.prefilling.pop(0)
        llm = self.llm
        output = SequenceOutput(llm.model.token_pieces, llm.model.eog_tokens, p.max_tokens, llm.n_ctx, p.stops)
        slot = _Slot(p.seq, p.job, output, p.draft, len(p.tokens), time.perf_counter(), reused=p.reused,
                     tokens=list(p.tokens))
        self.slots[p.seq] = slot
        self._deliver(slot, first)

    def _abandon(self, p: _Prefill, error: Exception | None) -> None:
        """A prompt that will not be served (error, cancelled, shutting down): free its slot."""
        self.prefilling.remove(p)
        self.session.seq_reset(p.seq)
        self.free.append(p.seq)
        if error is not None:
            p.job.emit(error)
        p.job.emit(_DONE)
        self._report()

    def _step(self) -> None:
        seqs = sorted(self.slots)
        try:
            steps = step_together(self.session, [(s, self.slots[s].draft, self.slots[s].last_k) for s in seqs],
                                  self.policy)
        except Exception as e:   # nothing of this step reached any slot: all of them end with the error
            for seq in seqs:
                self._finish(seq, error=e)
            return
        for seq, (k, result, _) in zip(seqs, steps):
            slot = self.slots[seq]
            slot.last_k = k
            slot.counters.count(result)
            self._deliver(slot, result)

    def _deliver(self, slot: _Slot, result) -> None:
        slot.tokens.extend(result.tokens)
        chunk = slot.output.push(result, self.session.seq_n_past(slot.seq))
        slot.n_generated += len(chunk.tokens)
        slot.job.emit(chunk)
        if chunk.finish_reason is not None:
            self._finish(slot.seq, error=None)

    def _drop_cancelled(self) -> None:
        for p in [p for p in self.prefilling if p.job.cancelled.is_set()]:
            self._abandon(p, error=None)
        for seq in [s for s, slot in self.slots.items() if slot.job.cancelled.is_set()]:
            self._finish(seq, error=None)

    def _finish(self, seq: int, error: Exception | None) -> None:
        slot = self.slots.pop(seq)
        try:
            if error is None:   # the slot keeps what its KV cache holds, for a prompt that shares it
                self.cached[seq] = slot.tokens[:self.session.seq_n_past(seq)]
            else:
                self.session.seq_reset(seq)
        finally:
            self.free.append(seq)
            if error is not None:
                slot.job.emit(error)
            else:
                stats = slot.stats()
                slot.job.emit(stats)
                end = time.perf_counter()
                self.metrics.generation_done(stats, end - slot.job.enqueued_at, slot.t_first - slot.job.enqueued_at)
            slot.job.emit(_DONE)
            self._report()

    def _report(self) -> None:
        self.metrics.set_load(running=len(self.slots), waiting=self.jobs.qsize() + len(self.prefilling))

