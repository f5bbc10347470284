#!/usr/bin/env python3
"""What a verify of k+1 rows costs in one-token decodes, measured finely interleaved, beside
upstream llama-bench's batch cost curve pp(k+1)/pp1 on the same model.

One session with the MTP heads, one sequence at a context depth. Each round runs a few
steps of every mode in a rotating order: plain decoding, and verifies of k+1 rows for each
k (drafts chosen to be rejected, so every step moves the sequence on by one token as a
plain step does). A mode's figure is the median over rounds of its step time over plain
decoding's in the same round: with rounds a fraction of a second long, a shared VM's slow
minutes hit both sides of each ratio. bench_vs_upstream.py's verify column times each
length in a generation of its own, seconds apart, which on a noisy VM moves its figures
by tens of percent.

Upstream's curve is llama-bench -p 1,2,...,K+1 -n 0 -r R (built by
scripts/build_upstream.sh from the same pinned tree); its pp(n) rows cost
n * pp1 / pp(n) one-token decodes, run before and after ours so a drift shows.

    python scripts/bench_verify_curve.py -m Q4_K_M.gguf -d 0,2048 --rounds 40 -t 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_auto import cpu_name   # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LLAMA_BENCH = ROOT / os.environ.get("UPSTREAM_BUILD", "build/upstream") / "bin" / "llama-bench"
STEPS_PER_TURN = 4


def ours(path: Path, depth: int, ks: list[int], rounds: int, threads: int) -> dict[int, float]:
    """Median over rounds of (a verify of k+1 rows) / (a one-token decode), per k (0: 1.0)."""
    from pyllama_mtp.config import ContextConfig, ModelConfig
    from pyllama_mtp.engine import Model, Session

    with Model(ModelConfig(str(path), load_mtp=True)) as model:
        n_ctx = depth + (rounds + 2) * STEPS_PER_TURN * (len(ks) + 1) + 64
        with Session(model, ContextConfig(n_ctx=n_ctx, threads=threads, draft_max=max(ks))) as s:
            s.prefill([10 + (13 * i) % 200 for i in range(max(depth, 1))])
            s.sample()

            def turn(k: int) -> float:
                t0 = time.perf_counter()
                for _ in range(STEPS_PER_TURN):
                    if k == 0:
                        s.step(0)
                    else:
                        # drafts of token 0, which the target nearly always rejects (a verify
                        # costs the same whatever it accepts)
                        s.verify([0] * k)
                return (time.perf_counter() - t0) / STEPS_PER_TURN

            modes = [0] + ks
            for k in modes:
                turn(k)                                   # warm-up: graphs built, buffers sized
            ratios: dict[int, list[float]] = {k: [] for k in modes}
            for r in range(rounds):
                order = modes[r % len(modes):] + modes[:r % len(modes)]
                t = {k: turn(k) for k in order}
                for k in modes:
                    ratios[k].append(t[k] / t[0])
    return {k: statistics.median(v) for k, v in ratios.items()}


def upstream(path: Path, depth: int, n_max: int, threads: int, reps: int) -> dict[int, float]:
    """llama-bench's pp(n) for n = 1..n_max as one-token decodes: n * pp1 / pp(n)."""
    ns = ",".join(str(n) for n in range(1, n_max + 1))
    out = subprocess.run([str(LLAMA_BENCH), "-m", str(path), "-p", ns, "-n", "0", "-d", str(depth), "-r", str(reps),
                          "-t", str(threads), "-o", "json"], capture_output=True, text=True, check=True)
    tps = {int(row["n_prompt"]): row["avg_ts"] for row in json.loads(out.stdout)}
    return {n - 1: n * tps[1] / tps[n] for n in tps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, action="append", required=True)
    ap.add_argument("-d", "--depths", default="0,2048")
    ap.add_argument("-k", "--drafts", default="1,2,3", help="draft lengths k: verifies of k+1 rows (default 1,2,3)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--upstream-reps", type=int, default=10, help="llama-bench -r (default 10); 0 skips upstream")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.drafts.split(",")]
    if args.upstream_reps and not LLAMA_BENCH.exists():
        print(f"{LLAMA_BENCH} not found: run scripts/build_upstream.sh, or pass --upstream-reps 0", file=sys.stderr)
        return 2
    results = []
    for path in args.model:
        for depth in (int(d) for d in args.depths.split(",")):
            row = {"model": path.name, "depth": depth}
            if args.upstream_reps:
                row["upstream_before"] = upstream(path, depth, max(ks) + 1, args.threads, args.upstream_reps)
            row["ours"] = ours(path, depth, ks, args.rounds, args.threads)
            if args.upstream_reps:
                row["upstream_after"] = upstream(path, depth, max(ks) + 1, args.threads, args.upstream_reps)
            results.append(row)
            print(f"{path.name} depth {depth}: done", file=sys.stderr, flush=True)
    print(f"\nCPU: {cpu_name()}, {args.threads} threads; ours: median over {args.rounds} rounds of paired step times; "
          "upstream: llama-bench n * pp1 / pp(n), before / after ours\n")
    print("| model | depth | rows | ours (decodes) | upstream (decodes) | ours / upstream |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in results:
        for k in ks:
            up = ""
            ratio = ""
            if "upstream_before" in row:
                a, b = row["upstream_before"][k], row["upstream_after"][k]
                up = f"{a:.2f} / {b:.2f}"
                ratio = f"{row['ours'][k] / statistics.mean([a, b]):.2f}x"
            print(f"| {row['model']} | {row['depth']} | {k + 1} | {row['ours'][k]:.2f} | {up} | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
