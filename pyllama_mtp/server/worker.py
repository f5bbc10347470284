"""One thread owns the Llama; HTTP handlers only enqueue jobs and read results.

A job is a prompt (token ids) plus generation options. The worker streams its
chunks back through a callback that hands them to the event loop; a cancelled job
(client gone) stops at the next decode step, and closing the Llama's stream keeps
the KV cache mirror consistent for the next request.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..llama import Llama

_DONE = object()


class ShuttingDown(Exception):
    """The server is stopping: this request was still queued and will not run."""


def refuse_queued(jobs: "queue.Queue[Job | None]") -> None:
    """Answer every job still waiting in ``jobs`` with ShuttingDown (used on SIGTERM)."""
    while True:
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            return
        if job is not None:
            job.emit(ShuttingDown("the server is shutting down; this request was not started"))
            job.emit(_DONE)


@dataclass
class Job:
    tokens: list[int]
    options: dict
    emit: Callable[[object], None]          # called from the worker thread, once per chunk, then with DONE
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)


class Worker:
    def __init__(self, llm: Llama, metrics):
        self.llm = llm
        self.metrics = metrics
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.draining = False                    # set on SIGTERM: nothing new starts
        self.shutdown_at: float | None = None    # time.monotonic() by which running requests end
        self.current: Job | None = None
        self.thread = threading.Thread(target=self._run, name="pyllama-mtp-worker", daemon=True)
        self.thread.start()

    DONE = _DONE

    def submit(self, job: Job) -> None:
        self.jobs.put(job)
        if self.draining:
            refuse_queued(self.jobs)

    def queued(self) -> int:
        """Requests waiting for their turn (not counting the one running)."""
        return self.jobs.qsize()

    def drain(self, grace_s: float | None = None) -> None:
        """Shutdown has begun: refuse what waits; the running request may go on for
        ``grace_s`` seconds (the app then ends it with ShuttingDown)."""
        if grace_s is not None and self.shutdown_at is None:
            self.shutdown_at = time.monotonic() + grace_s
        self.draining = True
        refuse_queued(self.jobs)

    def stop(self) -> None:
        self.drain()
        job = self.current
        if job is not None:
            job.cancelled.set()      # stops at its next step
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                job.emit(_DONE)
                continue
            self.current = job
            try:
                self._generate(job)
            except Exception as e:  # reported to the request, the worker lives on
                job.emit(e)
            finally:
                self.current = None
                job.emit(_DONE)

    def _generate(self, job: Job) -> None:
        llm = self.llm
        before = llm.stats
        t_first = None
        n_generated = 0
        reused = 0
        stream = llm.stream(job.tokens, **job.options)
        try:
            for chunk in stream:
                if t_first is None:
                    t_first = time.perf_counter()
                    reused = llm.prompt_tokens_reused
                    self.metrics.prompt_reused(reused)
                n_generated += len(chunk.tokens)
                job.emit(chunk)
                if job.cancelled.is_set():
                    break
        finally:
            stream.close()
        end = time.perf_counter()
        span = llm.stats.minus(before)
        stats = span.__class__(**{**span.__dict__, "n_prompt_tokens": len(job.tokens), "n_generated": n_generated,
                                        "extra": {**span.extra, "prompt_tokens_reused": reused}})
        job.emit(stats)
        self.metrics.generation_done(stats, end - job.enqueued_at,
                                     None if t_first is None else t_first - job.enqueued_at)
