#!/usr/bin/env python3
"""Plain decoding against upstream llama-bench's tg, interleaved, for the standing target
"plain decode >= 0.98x llama-bench tg".

For every model and depth, each round runs upstream's llama-bench (built by
scripts/build_upstream.sh from the same pinned tree) and pyllama-mtp-bench with the same
test (-p 0 -n N -d D, one repetition after each tool's own warm-up, same threads), in
alternating order; ours runs twice, without the MTP heads loaded (draft 0) and with them
loaded (draft 0 of a model whose heads are kept fed, as ``Llama(mtp=True)`` decodes when
drafting does not pay). Medians over rounds are reported; machines here are noisy, so a
round's order alternates and every figure is from this one run.

    python scripts/bench_plain_vs_tg.py -m Q4_K_M.gguf -m Q8_0.gguf -d 0,2048 -n 64 -t 2 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# where scripts/build_upstream.sh put upstream's tools (UPSTREAM_BUILD, as for that script)
LLAMA_BENCH = ROOT / os.environ.get("UPSTREAM_BUILD", "build/upstream") / "bin" / "llama-bench"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def upstream_tg(model: Path, depth: int, n_gen: int, threads: int) -> float:
    out = subprocess.run([str(LLAMA_BENCH), "-m", str(model), "-p", "0", "-n", str(n_gen), "-d", str(depth),
                          "-r", "1", "-t", str(threads), "-o", "json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]["avg_ts"]


def ours_tg(model: Path, depth: int, n_gen: int, threads: int, drafts: str) -> float:
    """pyllama-mtp-bench's draft-0 row (drafts "0": no MTP heads; "0,1": heads loaded)."""
    out = subprocess.run([sys.executable, "-m", "pyllama_mtp.bench.cli", "-m", str(model), "-p", "0", "-n", str(n_gen),
                          "-d", str(depth), "-r", "1", "-t", str(threads), "--draft", drafts, "-o", "json",
                          "--no-progress"], capture_output=True, text=True, check=True, cwd=os.getcwd())
    rows = json.loads(out.stdout)
    return next(r["avg_ts"] for r in rows if int(r["n_draft"]) == 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, action="append", required=True)
    ap.add_argument("-d", "--depths", default="0,2048")
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not LLAMA_BENCH.exists():
        print(f"{LLAMA_BENCH} is missing: run scripts/build_upstream.sh first", file=sys.stderr)
        return 2
    depths = [int(d) for d in args.depths.split(",")]
    cells = []
    for model in args.model:
        for depth in depths:
            runs = {"tg": [], "plain": [], "plain_heads": []}
            for r in range(args.rounds):
                order = ["tg", "plain", "plain_heads"]
                if r % 2:
                    order.reverse()
                for what in order:
                    if what == "tg":
                        value = upstream_tg(model, depth, args.n_gen, args.threads)
                    else:
                        value = ours_tg(model, depth, args.n_gen, args.threads, "0" if what == "plain" else "0,1")
                    runs[what].append(value)
                print(f"{model.name} d{depth} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()),
                      file=sys.stderr)
            med = {k: statistics.median(v) for k, v in runs.items()}
            cells.append({"model": model.name, "depth": depth, "runs": runs, "median": med,
                          "plain_over_tg": med["plain"] / med["tg"], "heads_over_tg": med["plain_heads"] / med["tg"]})
    print(f"{cpu_name()}, {args.threads} threads, tg{args.n_gen}, {args.rounds} interleaved rounds (medians)\n")
    print("| model | depth | llama-bench tg | ours plain (no heads) | ours plain (heads loaded) | ours / tg |")
    print("|---|---:|---:|---:|---:|---|")
    for c in cells:
        m = c["median"]
        print(f"| {c['model']} | {c['depth']} | {m['tg']:.1f} | {m['plain']:.1f} | {m['plain_heads']:.1f} | "
              f"{c['plain_over_tg']:.2f}x, {c['heads_over_tg']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "threads": args.threads, "cells": cells}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
