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
        self.thread = threading.Thread(target=self._run, name="pyllama-mtp-worker", daemon=True)
        self.thread.start()

    DONE = _DONE

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            try:
                self._generate(job)
            except Exception as e:  # reported to the request, the worker lives on
                job.emit(e)
            finally:
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
