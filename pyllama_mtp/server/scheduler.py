"""One thread owns the Llama and its sequence slots (``--parallel N``, 1 by default); HTTP
handlers only enqueue jobs and read results.

Every loop the scheduler frees the slots of cancelled jobs (clients that went away),
admits queued jobs into free slots, prefills one chunk of a waiting prompt, then steps
every active sequence together through the library's driver (``sequence.step_sequences``:
the MTP heads draft for all in one decode per head and the target verifies all in one
batch). Each sequence's chunks go to its own job as soon as the step returns; a finished
slot is free for the next queued job in the same loop. Jobs beyond N wait in the queue.

Prompts: while other slots generate, a new prompt is prefilled ``prefill_chunk`` tokens
per loop, so the running streams pause for one chunk at a time, not for the whole
prompt; with nothing else running it goes in at once. A finished slot keeps its tokens
in the KV cache: a new prompt goes to the free slot holding the longest common prefix
(``sequence.Slots``) and prefills only the rest, as a chat's next turn does.

``"auto"`` sequences take the draft length the Llama's policy picks for the number of
sequences in the step (0 when MTP does not pay at that batch size); a fixed draft (or
``mtp: false``) is used as given.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..llama import Llama
from ..options import PreparedCall
from ..sequence import Sequence, step_sequences

DONE = object()     # the last item a job's emit receives


class ShuttingDown(Exception):
    """The server is stopping: this request was still queued and will not run."""


@dataclass
class Job:
    """One request: a checked call and where its chunks go (then its stats, then DONE)."""
    call: PreparedCall
    emit: Callable[[object], None]          # called from the scheduler thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)


def refuse_queued(jobs: "queue.Queue[Job | None]") -> None:
    """Answer every job still waiting in ``jobs`` with ShuttingDown (used on SIGTERM)."""
    while True:
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            return
        if job is not None:
            job.emit(ShuttingDown("the server is shutting down; this request was not started"))
            job.emit(DONE)


@dataclass
class _Running:
    job: Job
    seq: Sequence


class Scheduler:
    DONE = DONE

    def __init__(self, llm: Llama, metrics, prefill_chunk: int = 128):
        self.llm = llm
        self.session = llm.session
        self.slots = llm._slots
        self.metrics = metrics
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.active: dict[int, _Running] = {}            # slot -> a sequence generating
        self.prefilling: list[_Running] = []              # admitted, prompt not fully in yet (FIFO)
        self.prefill_chunk = max(1, prefill_chunk)
        self.policy = llm._policy
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
        # the Llama is the server's alone: one turn of its gate for the scheduler's life
        with self.llm._gate.turn():
            while not self.stopping:
                self._drop_cancelled()
                if self.draining and not self.active and not self.prefilling:
                    time.sleep(0.05)   # nothing left to run: wait for stop()
                    continue
                self._admit(block=not self.active and not self.prefilling)
                if self.prefilling:
                    self._prefill_chunk()
                if self.active:
                    self._step()
            for r in list(self.prefilling):
                self._end(r, error=None)
            for r in list(self.active.values()):
                self._end(r, error=None)

    def _admit(self, block: bool) -> None:
        while self.slots.free and not self.stopping and not self.draining:
            try:
                job = self.jobs.get(timeout=0.5) if block else self.jobs.get_nowait()
            except queue.Empty:
                return
            block = False
            if job is None:
                self.stopping = True
                return
            if job.cancelled.is_set():
                job.emit(DONE)
                continue
            self._start(job)
        self._report()

    def _start(self, job: Job) -> None:
        r = _Running(job, self.llm.open_sequence(job.call))
        self.prefilling.append(r)
        try:
            r.seq.load(self.session)
        except Exception as e:   # reported to its request; the other slots go on
            self._end(r, error=e)
            return
        self.metrics.prompt_reused(r.seq.reused)

    def _prefill_chunk(self) -> None:
        """Prefill the oldest waiting prompt: all of it when no slot is generating, else one
        chunk; once it is in, sample its first token and make the slot active."""
        r = self.prefilling[0]
        try:
            if not r.seq.prefill(self.session, None if not self.active else self.prefill_chunk):
                return
            chunk = r.seq.begin(self.session)   # right after the prefill: no decode in between
        except Exception as e:   # reported to its request; the other slots go on
            self._end(r, error=e)
            return
        self.prefilling.pop(0)
        self.active[r.seq.seq] = r
        self._deliver(r, chunk)

    def _step(self) -> None:
        order = sorted(self.active)
        running = [self.active[seq] for seq in order]
        try:
            chunks = step_sequences(self.session, [r.seq for r in running], self.policy)
        except Exception as e:   # nothing of this step reached any slot: all of them end with the error
            for r in running:
                self._end(r, error=e)
            return
        for r, chunk in zip(running, chunks):
            self._deliver(r, chunk)

    def _deliver(self, r: _Running, chunk) -> None:
        r.job.emit(chunk)
        if r.seq.done:
            self._end(r, error=None)

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.prefilling if r.job.cancelled.is_set()]:
            self._end(r, error=None)
        for r in [r for r in self.active.values() if r.job.cancelled.is_set()]:
            self._end(r, error=None)

    def _end(self, r: _Running, error: Exception | None) -> None:
        """A sequence is over (finished, cancelled, failed or shut down): its slot is free
        again, keeping what its KV cache holds unless an error left that unknown."""
        s = r.seq
        if r in self.prefilling:
            self.prefilling.remove(r)
        self.active.pop(s.seq, None)
        s.end("stop" if error is None else "error")
        try:
            if error is None and s.prefilled:
                self.llm.release(s)
            else:
                try:
                    self.session.seq_reset(s.seq)
                finally:
                    self.slots.give_back(s.seq, [])
        finally:
            if error is not None:
                r.job.emit(error)
            elif s.t_first is not None:
                stats = s.stats()
                r.job.emit(stats)
                self.metrics.generation_done(stats, time.perf_counter() - r.job.enqueued_at,
                                             s.t_first - r.job.enqueued_at)
            r.job.emit(DONE)
            self._report()

    def _report(self) -> None:
        self.metrics.set_load(running=len(self.active), waiting=self.jobs.qsize() + len(self.prefilling))
