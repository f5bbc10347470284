#!/usr/bin/env python3
"""Decode speed of one oracle step35 model spread over RPC workers on this host, MTP off
and on, with added network latency. Everything in one run:

  * local only; 1 worker; 2 workers (workers are pyllama-mtp-rpc-worker subprocesses);
  * RTT 0 (direct loopback) and, through a delaying proxy, e.g. 0.5 ms and 2 ms;
  * draft 0 (MTP off) and 1..3, with the MTP layers local (default) and, for the largest
    draft, placed by the layer split;
  * network round trips per generated token (counted by the proxy);
  * a projection of per-token time = time at RTT 0 + round trips x RTT (where 2x falls);
  * model load time from a worker with --cache, cold and warm.

    python scripts/bench_rpc.py --size-gb 0.5 --acceptance 0.9 -t 2 -n 96 --rtt-ms 0 0.5 2

Workers and client share this machine's cores: the layers of one token are computed one
device after another, so they do not compete, but the absolute speed is below that of
separate hosts. Ratios (MTP vs off, at the same RTT) are what this measures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_vs_upstream import ensure_model  # noqa: E402  (same oracle files)

from pyllama_mtp import Llama  # noqa: E402
sys.path.insert(0, str(ROOT / "tests"))          # local RPC workers are a test factory
from factories.rpc_local import DelayProxy, LocalWorker  # noqa: E402

PROMPT = [10, 11, 12, 13]   # token ids, as in bench_vs_upstream.py


def decode_rate(llm: Llama, n_gen: int, draft: int, reps: int) -> float:
    rates = []
    llm.generate(PROMPT, max_tokens=4, draft=draft)      # warm-up: buffers, graphs
    for _ in range(reps):
        r = llm.generate(PROMPT, max_tokens=n_gen, draft=draft)
        rates.append(r.stats.tokens_per_second)
    return statistics.median(rates)


def run_config(model: Path, endpoints: list[str], proxies: list[DelayProxy], draft: int, args,
               placement: str = "local") -> dict:
    kw = dict(threads=args.threads, n_ctx=max(512, 2 * args.n_gen))
    if endpoints:
        kw.update(rpc=endpoints, n_gpu_layers=args.remote_layers, mtp_placement=placement)
    with Llama(model, mtp=draft > 0, draft=max(draft, 1), **kw) as llm:
        for p in proxies:
            p.reset_count()
        res = llm.generate(PROMPT, max_tokens=args.n_gen, draft=draft)
        n_rt = sum(p.round_trips for p in proxies)   # prompt included: a few round trips in all
        rate = decode_rate(llm, args.n_gen, draft, args.reps)
        return {"tok_s": rate, "tokens": len(res.tokens),
                "round_trips_per_token": (n_rt / len(res.tokens)) if proxies else None,
                "acceptance": res.stats.acceptance_rate if draft else None}


def cache_load_times(model: Path, args) -> dict:
    """Load time over a link paced to --link-gbit, with a fresh worker each time sharing one
    --cache directory: the second load sends hashes for tensors above 10 MB, not their bytes."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for label in ("no cache", "cache cold", "cache warm"):
            with LocalWorker(threads=args.threads, cache_dir=None if label == "no cache" else cache) as w, \
                    DelayProxy(w.port, 0.0, bytes_per_s=args.link_gbit * 1e9 / 8) as link:
                t0 = time.perf_counter()
                with Llama(model, threads=args.threads, n_ctx=256, rpc=[link.endpoint],
                           n_gpu_layers=args.remote_layers):
                    out[label] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=0.5)
    ap.add_argument("--acceptance", type=float, default=0.9)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=96)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--drafts", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 0.5, 2.0])
    ap.add_argument("--remote-layers", type=int, default=-1,
                    help="trunk layers on the workers (n_gpu_layers; -1 = all)")
    ap.add_argument("--link-gbit", type=float, default=1.0, help="link speed for the --cache load test")
    ap.add_argument("--cache-only", action="store_true", help="only the --cache load test")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    model = ensure_model(ROOT / "build" / "bench" / f"oracle-{args.size_gb}gb-a{args.acceptance}.gguf",
                         args.size_gb, args.acceptance)
    if args.cache_only:
        cache = cache_load_times(model, args)
        print(f"{model.name}: model load over a {args.link_gbit:g} Gbit/s link: " +
              ", ".join(f"{k} {v:.2f} s" for k, v in cache.items()))
        return 0
    rows = []
    for d in args.drafts:
        rows.append({"workers": 0, "rtt_ms": 0.0, "draft": d, "placement": "-", **run_config(model, [], [], d, args)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    for n_workers in (1, 2):
        workers = [LocalWorker(threads=args.threads) for _ in range(n_workers)]
        try:
            for rtt in args.rtt_ms:
                proxies = [DelayProxy(w.port, rtt / 2000.0) for w in workers] if rtt > 0 else []
                endpoints = [p.endpoint for p in proxies] if proxies else [w.endpoint for w in workers]
                configs = [(d, "local") for d in args.drafts] + [(max(args.drafts), "split")]
                for d, placement in configs:
                    if d == 0 and placement == "split":
                        continue
                    r = run_config(model, endpoints, proxies, d, args, placement)
                    rows.append({"workers": n_workers, "rtt_ms": rtt, "draft": d, "placement": placement, **r})
                    print(json.dumps(rows[-1]), file=sys.stderr)
                for p in proxies:
                    p.close()
        finally:
            for w in workers:
                w.kill()

    # the count does not depend on the latency: direct runs take it from the proxied ones
    counted = {(r["workers"], r["draft"], r["placement"]): r["round_trips_per_token"] for r in rows
               if r["round_trips_per_token"] is not None}
    for r in rows:
        if r["round_trips_per_token"] is None and r["workers"]:
            r["round_trips_per_token"] = counted.get((r["workers"], r["draft"], r["placement"]))
    # The simplest latency model: per-token time = time at RTT 0 + round trips per token x RTT.
    # (A least-squares fit over the few RTT points is too noisy when the network share is small.)
    fits = {}
    for n_workers in (1, 2):
        base_rows = {r["draft"]: r for r in rows if r["workers"] == n_workers and r["rtt_ms"] == 0.0
                     and r["placement"] == "local"}
        off = base_rows.get(0)
        for d, r in base_rows.items():
            if d == 0 or off is None or r["round_trips_per_token"] is None:
                continue
            t_off, t_on = 1000 / off["tok_s"], 1000 / r["tok_s"]
            rt_off, rt_on = off["round_trips_per_token"], r["round_trips_per_token"]
            # 2x when t_off + rt_off x R = 2 (t_on + rt_on x R)
            slope = rt_off - 2 * rt_on
            rtt_2x = (2 * t_on - t_off) / slope if slope > 0 else None
            fits[f"{n_workers}w-d{d}"] = {"ms_per_token_off": t_off, "ms_per_token_on": t_on,
                                          "rt_off": rt_off, "rt_on": rt_on, "rtt_ms_for_2x": rtt_2x}
    cache = cache_load_times(model, args)

    base = {(r["workers"], r["rtt_ms"]): r["tok_s"] for r in rows if r["draft"] == 0}
    print(f"\n{model.name}: {model.stat().st_size / 1e9:.2f} GB, {args.threads} threads, {args.n_gen} tokens, "
          f"medians of {args.reps}")
    print("| workers | RTT ms | draft | MTP layers | tok/s | vs MTP off | round trips/token | acceptance |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        off = base.get((r["workers"], r["rtt_ms"]))
        rt = "-" if r["round_trips_per_token"] is None else f"{r['round_trips_per_token']:.2f}"
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        print(f"| {r['workers']} | {r['rtt_ms']:g} | {r['draft']} | {r['placement']} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / off:.2f}x | {rt} | {acc} |")
    print("\nprojection: per-token time = time at RTT 0 + round trips per token x RTT")
    for key, f in fits.items():
        at = "never" if f["rtt_ms_for_2x"] is None else f"{f['rtt_ms_for_2x']:.1f} ms RTT"
        print(f"  {key}: {f['ms_per_token_off']:.1f} ms + {f['rt_off']:.2f} RTT (off) vs "
              f"{f['ms_per_token_on']:.1f} ms + {f['rt_on']:.2f} RTT (MTP): 2x at {at}")
    print(f"\nmodel load over a {args.link_gbit:g} Gbit/s link: " +
          ", ".join(f"{k} {v:.2f} s" for k, v in cache.items()))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "fits": fits, "cache": cache}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
