"""draft="auto" against plain decoding and every fixed draft length, side by side.

For each model, context depth and generation length, rounds run every mode once each
(plain, draft 1..max, auto) in a rotating order, so that the machine's drift hits all
modes alike; plain decoding runs in a context without the MTP heads (what ``mtp=False``
decodes), the other modes in one with them; the figure of a mode is the median of its
rounds' decode speeds. Ratios are paired: auto over plain (or over the best fixed length,
the fixed length with the best median) is taken within each round, where the modes ran
seconds apart, and the median of those per-round ratios is reported; on a shared machine
whose speed drifts by 10-25% between rounds, a ratio of two medians mixes that drift in.
"noise" is the spread of plain decoding's speed over the rounds ((max - min) / median).
The auto policy lives across rounds, as it does across the calls of one Llama, and starts
fresh for each (depth, length) cell. Greedy, random prompt tokens; the depth is a random
prefix prefilled once and kept (rollback) under each round's prompt.

Targets (issue "draft='auto' never loses"): auto >= 0.97x plain in every cell, and
>= 0.95x the best fixed draft wherever that beats plain by >= 10%.

    python scripts/bench_auto.py -m tiny:step35 -m tiny:step35-random -n 64,192,1024 -d 0,2048
    python scripts/bench_auto.py -m oracle.gguf -n 192 -d 0,2048 --rounds 5 --json out.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def accelerators() -> str:
    """This build's GPUs (every layer goes there: ModelConfig's n_gpu_layers=-1), or ''."""
    from pyllama_mtp.engine import local_devices
    return ", ".join(f"{d.name} ({d.description})" for d in local_devices() if d.type in ("gpu", "igpu"))


def run_cell(path: str, depth: int, n_gen: int, rounds: int, threads: int, seed: int) -> dict:
    from pyllama_mtp.config import ContextConfig, ModelConfig, SamplingParams
    from pyllama_mtp.draft_policy import BatchDraftPolicy
    from pyllama_mtp.engine import Model, Session
    from pyllama_mtp.exactness import check_session
    from pyllama_mtp.options import PreparedCall
    from pyllama_mtp.sequence import Sequence, step_sequences

    with Model(ModelConfig(path, load_mtp=True)) as model:
        heads = model.info.n_layer_mtp
        draft_max = heads if heads > 1 else 4
        n_ctx = depth + n_gen + 64
        with Session(model, ContextConfig(n_ctx=n_ctx, threads=threads, draft_max=draft_max)) as s, \
                Session(model, ContextConfig(n_ctx=n_ctx, threads=threads)) as without_heads:
            rng = np.random.default_rng(seed)
            n_vocab = model.info.n_vocab
            prefix = [int(t) for t in rng.integers(3, n_vocab - 8, size=depth)]
            held: dict[int, list[int]] = {}                 # what each session's sequence 0 holds
            policy = BatchDraftPolicy(s.draft_max)
            policy.seed(check_session(s).seed)               # as a Llama does at load: "auto" starts from it
            modes: list = list(range(s.draft_max + 1)) + ["auto"]
            rates: dict = {m: [] for m in modes}
            chosen: dict[int, int] = {}
            for r in range(rounds + 1):                     # round 0 warms up and is not counted
                order = modes[r % len(modes):] + modes[:r % len(modes)]
                prompt = [int(t) for t in rng.integers(3, n_vocab - 8, size=8)]
                for mode in order:
                    # the library's driver, one sequence, no text; the prefix stays in the cache;
                    # max_tokens as a generate call would pass it (auto weighs it)
                    sess = without_heads if mode == 0 else s
                    seq = Sequence(0, PreparedCall(prefix + prompt, n_gen, SamplingParams(), mode, ()), None,
                                   held.get(id(sess), []))
                    seq.load(sess)
                    seq.prefill(sess)
                    seq.begin(sess)
                    t0 = time.perf_counter()
                    while seq.n_generated < n_gen:
                        step_sequences(sess, [seq], policy if mode == "auto" else None)
                        if mode == "auto" and r:
                            chosen[seq.last_k] = chosen.get(seq.last_k, 0) + 1
                    if r:
                        rates[mode].append((seq.n_generated - 1) / (time.perf_counter() - t0))
                    held[id(sess)] = seq.cached(sess.seq_n_past(0))
    med = {str(m): statistics.median(v) for m, v in rates.items()}
    fixed = {m: v for m, v in med.items() if m not in ("0", "auto")}
    best_fixed = max(fixed, key=fixed.get)

    def paired(a, b) -> float:
        """Median over rounds of mode a's speed over mode b's in the same round."""
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    best_mode = int(best_fixed)
    plain = rates[0]
    return {"depth": depth, "n_gen": n_gen, "tok_s": med, "per_round": {str(m): v for m, v in rates.items()},
            "auto_chose": chosen, "noise": (max(plain) - min(plain)) / statistics.median(plain),
            "auto_over_plain": paired("auto", 0), "best_fixed": best_mode,
            "best_fixed_over_plain": paired(best_mode, 0),
            "auto_over_best_fixed": paired("auto", best_mode)}


def verdict(cell: dict) -> list[str]:
    misses = []
    if cell["auto_over_plain"] < 0.97:
        misses.append("auto < 0.97x plain")
    if cell["best_fixed_over_plain"] >= 1.10 and cell["auto_over_best_fixed"] < 0.95:
        misses.append("auto < 0.95x the best fixed draft")
    return misses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", action="append", required=True, help="GGUF path or built-in name (repeatable)")
    ap.add_argument("-n", "--n-gen", default="64,192", help="generated tokens per run (default 64,192)")
    ap.add_argument("-d", "--depth", default="0", help="context depths (default 0)")
    ap.add_argument("--rounds", type=int, default=7, help="counted rounds per cell (default 7)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the cells here")
    args = ap.parse_args(argv)
    from pyllama_mtp.bench.builtin import resolve

    out = {"cpu": cpu_name(), "gpu": accelerators(), "threads": args.threads, "rounds": args.rounds, "cells": []}
    where = f"every layer on {out['gpu']}, host CPU {out['cpu']}" if out["gpu"] else f"CPU: {out['cpu']}"
    print(f"{where}, {args.threads} threads, median of {args.rounds} interleaved rounds; ratios paired within rounds\n")
    print("| model | depth | tokens | plain tok/s | noise | best fixed | auto tok/s | auto / plain | auto / best fixed | auto chose |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |")
    failed = 0
    for name in args.model:
        path = resolve(name) if name.startswith("tiny:") else name
        for depth in (int(x) for x in args.depth.split(",")):
            for n_gen in (int(x) for x in args.n_gen.split(",")):
                cell = run_cell(path, depth, n_gen, args.rounds, args.threads, args.seed)
                cell["model"] = name
                cell["missed"] = verdict(cell)
                failed += bool(cell["missed"])
                out["cells"].append(cell)
                med = cell["tok_s"]
                total = sum(cell["auto_chose"].values()) or 1
                mix = ", ".join(f"{k}: {100 * v / total:.0f}%" for k, v in sorted(cell["auto_chose"].items()))
                print(f"| {name} | {depth} | {n_gen} | {med['0']:.1f} | {100 * cell['noise']:.0f}% | d{cell['best_fixed']} "
                      f"{cell['best_fixed_over_plain']:.2f}x | {med['auto']:.1f} | {cell['auto_over_plain']:.2f}x | "
                      f"{cell['auto_over_best_fixed']:.2f}x | {mix}{' **' + '; '.join(cell['missed']) + '**' if cell['missed'] else ''} |",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(f"\n{len(out['cells']) - failed} of {len(out['cells'])} cells meet the targets")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
