#!/usr/bin/env python3
"""draft="auto" on a Llama's first generation, against fixed drafts, side by side.

``scripts/bench_auto.py`` lets the policy live across rounds, as it does across the calls
of one Llama. This measures the other end: every ``auto`` call is the first generation of
a new ``Llama`` (load, the load-time check, a 4-token plain call that prefills the prompt,
then the measured call), so its policy starts from the check's figures alone
(``BatchDraftPolicy.seed``). "unseeded" is the same cold call with ``check_exact=False``,
which skips the check and so the start. The fixed drafts and plain decoding run in one
warm Llama that stays loaded beside the cold ones (as a second model in a process would).
Per-round ratios are paired and their medians reported.

    python scripts/bench_auto_cold.py -m oracle-q4_k_m.gguf -d 2048 -n 64 --rounds 4
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

from bench_auto import cpu_name        # (this directory is on the path of a script run from it)
from pyllama_mtp import Llama
from pyllama_mtp.bench.builtin import resolve


def cell(path: str, depth: int, n_gen: int, rounds: int, threads: int) -> dict[str, list[float]]:
    rng = random.Random(depth)
    prefix = [rng.randrange(10, 200) for _ in range(depth)]
    kw = dict(n_ctx=depth + n_gen + 64, threads=threads, mtp=True, draft=3)
    speeds: dict[str, list[float]] = {m: [] for m in ("0", "1", "2", "3", "auto", "unseeded")}
    with Llama(path, **kw) as warm:
        for r in range(rounds):
            prompt = prefix + [rng.randrange(10, 200) for _ in range(8)]
            warm.generate(prompt, max_tokens=4, draft=0)
            for d in (0, 1, 2, 3):
                speeds[str(d)].append(warm.generate(prompt, max_tokens=n_gen, draft=d).stats.tokens_per_second)
            for name in ("auto", "unseeded") if r % 2 else ("unseeded", "auto"):
                with Llama(path, check_exact=name == "auto", **kw) as cold:
                    cold.generate(prompt, max_tokens=4, draft=0)
                    speeds[name].append(cold.generate(prompt, max_tokens=n_gen, draft="auto").stats.tokens_per_second)
            print(f"  round {r}: " + ", ".join(f"{m} {v[-1]:.1f}" for m, v in speeds.items()), file=sys.stderr, flush=True)
    return speeds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", action="append", required=True, help="GGUF path or built-in tiny:... name")
    ap.add_argument("-d", "--depth", default="0", help="context depths (default 0)")
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"CPU: {cpu_name()}, {args.threads} threads, {args.n_gen} tokens, {args.rounds} rounds (paired medians)\n")
    print("| model | depth | plain tok/s | best fixed / plain | auto / plain | auto / best | unseeded / plain | unseeded / best |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for name in args.model:
        for depth in (int(d) for d in args.depth.split(",")):
            s = cell(resolve(name), depth, args.n_gen, args.rounds, args.threads)
            med = {m: statistics.median(v) for m, v in s.items()}
            best = max(("1", "2", "3"), key=lambda m: med[m])
            ratio = lambda a, b: statistics.median(x / y for x, y in zip(s[a], s[b]))
            print(f"| {Path(name).name} | {depth} | {med['0']:.1f} | d{best} {ratio(best, '0'):.2f}x | "
                  f"{ratio('auto', '0'):.2f}x | {ratio('auto', best):.2f}x | {ratio('unseeded', '0'):.2f}x | "
                  f"{ratio('unseeded', best):.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
