#!/usr/bin/env python3
"""Aggregate decode speed of ``Llama.generate_batch`` for 1/2/4/8/16 prompts, MTP off / fixed /
auto, against the same prompts run one by one through ``generate`` and against upstream
llama-server (same pinned tree, model and threads; built by scripts/build_upstream.sh) with
``-np`` slots and N concurrent clients, plain and with its draft-mtp. All in one run; every
batch's greedy output is checked against the one-by-one output.

    python scripts/bench_batch.py -m MODEL.gguf -t 2 -n 64 --counts 1,2,4,8,16 --drafts 0,3,auto --rounds 3

Aggregate tok/s = every generated token of the N prompts / wall time from the first request
to the last result (prompt processing included, as a user of a batch sees it).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_upstream import UpstreamServer, ensure_upstream   # noqa: E402


def make_prompts(n_vocab: int, count: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, min(n_vocab, 200)) for _ in range(rng.randrange(8, 40))] for _ in range(count)]


def ours(llm, prompts, n_gen: int, draft) -> dict:
    t0 = time.perf_counter()
    batch = llm.generate_batch(prompts, max_tokens=n_gen, draft=draft, progress=False)
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = [llm.generate(p, max_tokens=n_gen, draft=draft) for p in prompts]
    t_alone = time.perf_counter() - t0
    assert [r.tokens for r in batch] == [r.tokens for r in alone], f"draft {draft}: a batch output differs"
    return {"batch": sum(len(r.tokens) for r in batch) / t_batch,
            "alone": sum(len(r.tokens) for r in alone) / t_alone}


def ours_rounds(llm, prompts, n_gen: int, drafts, rounds: int) -> dict:
    """Median over rounds of every draft, the drafts in a rotating order each round (the
    auto policies live on across rounds, as across the calls of one Llama)."""
    runs = {d: [] for d in drafts}
    for r in range(rounds):
        for d in drafts[r % len(drafts):] + drafts[:r % len(drafts)]:
            runs[d].append(ours(llm, prompts, n_gen, d))
    return {d: {key: statistics.median(x[key] for x in runs[d]) for key in ("batch", "alone")} for d in drafts}


def upstream(server: UpstreamServer, prompts, n_gen: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: server.complete(p, n_gen), prompts))
    wall = time.perf_counter() - t0
    return sum(r["tokens_predicted"] for r in replies) / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, required=True)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("--counts", default="1,2,4,8,16")
    ap.add_argument("--drafts", default="0,3,auto", help="ours: draft lengths (0 = MTP off)")
    ap.add_argument("--rounds", type=int, default=1, help="ours: median of this many rounds per cell")
    ap.add_argument("--upstream-draft", type=int, default=3, help="upstream draft-mtp length (0: plain only)")
    args = ap.parse_args()

    from pyllama_mtp import Llama
    counts = [int(c) for c in args.counts.split(",")]
    drafts = [d if d == "auto" else int(d) for d in args.drafts.split(",")]
    slots, n_ctx = max(counts), 64 + args.n_gen
    with Llama(args.model, mtp=True, draft=3, parallel=slots, n_ctx=n_ctx, threads=args.threads) as llm:
        prompts = make_prompts(llm.info.n_vocab, slots)
        llm.generate_batch(prompts[:2], max_tokens=8, progress=False)    # warm-up
        table = {n: ours_rounds(llm, prompts[:n], args.n_gen, drafts, args.rounds) for n in counts}
    up = {}
    ensure_upstream()
    for k in sorted({0, args.upstream_draft}):
        server = UpstreamServer(args.model, args.threads, k, n_ctx, parallel=slots)
        try:
            server.complete(prompts[0], 4)                               # warm-up
            up[k] = {n: upstream(server, prompts[:n], args.n_gen) for n in counts}
        finally:
            server.close()

    head = ["prompts"] + [f"ours batch d{d}" for d in drafts] + [f"ours one by one d{d}" for d in drafts]
    head += [f"upstream -np {slots} d{k}" for k in sorted(up)] + ["ours best batch / upstream best"]
    print(f"model {args.model.name}, {args.threads} threads, {args.n_gen} tokens per prompt, greedy; aggregate tok/s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---:|" * len(head))
    for n in counts:
        row = [str(n)] + [f"{table[n][d]['batch']:.1f}" for d in drafts]
        row += [f"{table[n][d]['alone']:.1f}" for d in drafts]
        row += [f"{up[k][n]:.1f}" for k in sorted(up)]
        best_ours = max(table[n][d]["batch"] for d in drafts)
        row.append(f"{best_ours / max(up[k][n] for k in up):.2f}x")
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
