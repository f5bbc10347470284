#!/usr/bin/env python3
"""Plain decode steps called from different threads of one process.

A program decodes from more than one thread: a server loads the model on its main thread
and decodes on a scheduler thread, a web app calls from a worker pool, the load-time
exactness check runs on a thread of its own. With OpenMP (ggml's default thread pool on
Linux) every thread that has computed a graph keeps a pool of worker threads, and once
the process holds more of them than cores, libgomp throttles its barriers; vendor patch
0025 keeps ggml's per-node barriers out of that. This reports, for each model, the median
plain step (one sequence, one token) when called

- from the thread that decoded first ("first thread"),
- from a new thread after that ("other thread"; its ratio to the first is what the patch
  is about: 1.0 is the goal),
- and the tokens per second of two sessions decoding at once from two threads (twice the
  compute threads the cores can run: the barrier must yield, not spin).

Rounds alternate the cases; every figure comes from this one run.

    python scripts/bench_threads.py -m model.gguf [-m tiny.gguf] -t 2 --steps 40 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

from bench_auto import cpu_name        # (this directory is on the path of a script run from it)
from pyllama_mtp.bench.builtin import resolve
from pyllama_mtp.config import ContextConfig, ModelConfig
from pyllama_mtp.engine import Model, Session

WARM_STEPS = 4      # the first steps of a run on a thread are not counted (graphs, caches)


def new_session(model: Model, threads: int, prompt: list[int]) -> Session:
    s = Session(model, ContextConfig(n_ctx=len(prompt) + 4096, threads=threads, draft_max=0, n_seq_max=1))
    s.seq_prefill(0, prompt)
    s.seq_sample(0)
    return s


def step_times(session: Session, steps: int, out: list[float]) -> None:
    for i in range(WARM_STEPS + steps):
        t0 = time.perf_counter()
        session.step_batch([0], [0])
        if i >= WARM_STEPS:
            out.append(time.perf_counter() - t0)


def on_thread(fn, *args) -> None:
    t = threading.Thread(target=fn, args=args)
    t.start()
    t.join()


def bench(path: str, threads: int, steps: int, rounds: int) -> dict[str, float]:
    prompt = list(range(10, 42))
    first, other, together = [], [], []
    with Model(ModelConfig(path, load_mtp=False)) as model:
        a, b = new_session(model, threads, prompt), new_session(model, threads, prompt)
        try:
            for r in range(rounds):
                cases = [lambda: step_times(a, steps, first), lambda: on_thread(step_times, a, steps, other)]
                for case in cases if r % 2 == 0 else reversed(cases):
                    case()
                t0 = time.perf_counter()
                pair = [threading.Thread(target=step_times, args=(s, steps, [])) for s in (a, b)]
                for t in pair:
                    t.start()
                for t in pair:
                    t.join()
                together.append(2 * (WARM_STEPS + steps) / (time.perf_counter() - t0))
        finally:
            a.close()
            b.close()
    return {"first_ms": 1e3 * statistics.median(first), "other_ms": 1e3 * statistics.median(other),
            "two_at_once_tps": statistics.median(together)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", action="append", required=True, help="GGUF path or built-in tiny:... name")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"CPU: {cpu_name()}, {args.threads} threads, {args.steps} steps x {args.rounds} rounds (medians)\n")
    print("| model | first thread (ms/step) | other thread (ms/step) | other / first | two sessions at once (tok/s) |")
    print("|---|---:|---:|---:|---:|")
    for name in args.model:
        r = bench(resolve(name), args.threads, args.steps, args.rounds)
        print(f"| {Path(name).name} | {r['first_ms']:.2f} | {r['other_ms']:.2f} | "
              f"{r['other_ms'] / r['first_ms']:.2f}x | {r['two_at_once_tps']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
