"""draft="auto" on a simulated server: N clients sending requests back to back, every step's
cost from a table, acceptance drawn per draft, against every fixed draft length.

scripts/simulate_auto.py isolates the one-sequence policy (DraftPolicy); this runs the
server's (BatchDraftPolicy) as the sequence driver uses it: one size class per batch size,
the rows queued while decoding plainly (at most ``heads_window`` of them) caught up before
drafting starts again and priced before it (``switch_in``), a newcomer admitted to draft
only where its catch-up pays (``admits``; held, it decodes plainly in a call of its own, and
a probe from plain decoding waits while any is held, as ``sequence._admit_newcomers`` has
it), and the load-time check's acceptance as a prior (``--check``). Each client's next request arrives a step after its last one ended, so the
batch shrinks for a step or two between requests; and as under the server benchmark, one
policy serves the client counts in turn (1, then 2, ...: a size class first seen after
another starts from that one's costs, scaled, as guesses).

Step costs (ms, by batch size and draft length; ``--costs-from TRACE`` takes the medians of
the steady steps of a PYLLAMA_MTP_DRAFT_TRACE file instead, filling lengths it lacks along
a line through the ones it has): a traced server run at 1, 2, 4 and 8 clients on the
0.7 GB Q4_K_M acceptance-0.6 oracle, Intel Xeon without AMX, 2 threads, depth ~64 (the
lengths it timed on fewer than three steady steps from that line); other batch sizes
between the nearest two along a line.

    python scripts/simulate_server_auto.py
    python scripts/simulate_server_auto.py --clients 2,8 --acceptance 0.6 --seeds 40
    python scripts/simulate_server_auto.py --baseline /tmp/old/draft_policy.py   # A/B two policies
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pyllama_mtp import draft_policy  # noqa: E402

TRACED_MS = {1: {0: 11.4, 1: 13.7, 2: 17.6, 3: 18.9},
             2: {0: 16.3, 1: 23.1, 2: 30.1, 3: 34.2},
             3: {0: 19.3, 1: 29.4, 2: 39.5, 3: 49.6},
             4: {0: 22.8, 1: 31.8, 2: 47.8, 3: 60.3},
             8: {0: 31.3, 1: 53.1, 2: 78.3, 3: 101.2}}
PROMPT_ROWS = 17          # a request's prompt rows the heads take before its first drafting step
ROW_CATCH_UP_MS = 0.4     # the heads' cost per row caught up (as traced: 25 ms for ~60 rows)
PREFILL_MS = 10.0         # a new request's prompt, between steps


def costs_from_trace(path: Path) -> dict[int, dict[int, float]]:
    """Median ms of the steady steps (timed, batch unchanged) per batch size and length."""
    samples: dict[tuple[int, int], list[float]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("timed") and r.get("same"):
            samples.setdefault((r["n"], r["k"]), []).append(r["s"] * 1e3)
    table: dict[int, dict[int, float]] = {}
    for (n, k), xs in samples.items():
        table.setdefault(n, {})[k] = statistics.median(xs)
    for n, by_k in table.items():
        if len(by_k) >= 2:
            ks = sorted(by_k)
            slope, icept = np.polyfit(ks, [by_k[k] for k in ks], 1)
            for k in range(4):
                by_k.setdefault(k, float(icept + slope * k))
    return table


def step_ms(table, n: int, k: int) -> float:
    """A step of n sequences with k drafts: the table's, or along a line between the two
    nearest batch sizes it has (beyond them, through the last two)."""
    sizes = sorted(m for m in table if k in table[m])
    if n in sizes:
        return table[n][k]
    if len(sizes) == 1:
        return table[sizes[0]][k] * n / sizes[0]
    below, above = [m for m in sizes if m < n], [m for m in sizes if m > n]
    lo, hi = (below[-1], above[0]) if below and above else (sizes[-2], sizes[-1]) if below else (sizes[0], sizes[1])
    t_lo, t_hi = table[lo][k], table[hi][k]
    return t_lo + (t_hi - t_lo) * (n - lo) / (hi - lo)


class Fixed:
    """A fixed draft length in BatchDraftPolicy's shape (the baselines)."""

    def __init__(self, k: int):
        self.k = k

    def choose(self, n, depth=0, switch_in=None):
        return self.k

    def observe_catch_up(self, *args):
        pass

    def update(self, *args, **kwargs):
        pass


def new_policy(module, check: list[list[int]] | None):
    """A batch policy of ``module`` (a draft_policy), started from the check's acceptance."""
    policy = module.BatchDraftPolicy(3)
    if check:
        policy.acceptance.observe_texts(3, check)
    return policy


def run(policy, table, *, clients: int, acceptance: float, rng, requests: int, n_gen: int,
        noise: float, drift: float, module=draft_policy) -> tuple[float, float]:
    """Tokens per second of the whole run, and the share of full-batch steps auto decoded plainly."""
    auto = isinstance(policy, module.BatchDraftPolicy)
    left = {c: n_gen for c in range(clients)}
    sent = {c: 1 for c in range(clients)}
    queued = {c: PROMPT_ROWS for c in range(clients)}
    fresh, held, waiting = set(left), set(), {}
    tokens, elapsed, speed, step, full, full_plain = 0, 0.0, 1.0, 0, 0, 0
    while left or waiting:
        for c in [c for c, due in waiting.items() if due <= step or not left]:
            del waiting[c]
            left[c], queued[c] = n_gen, PROMPT_ROWS
            fresh.add(c)
            held.discard(c)
            elapsed += PREFILL_MS / 1e3
        step += 1
        if drift and step % 100 == 0:
            speed = float(np.exp(rng.normal(0.0, drift)))
        members = tuple(sorted(left))
        n = len(members)
        switching = [c for c in members if queued[c] and c not in held and (c not in fresh or n == 1)]
        k = policy.choose(n, 64, [(queued[c], left[c]) for c in switching])
        if k > 0 and auto:
            p = policy.policy(n)
            for c in members:
                if c in held or (c in fresh and n > 1):
                    (held.discard if policy.admits(p, k, queued[c], left[c]) else held.add)(c)
            if policy.holds_off(p, len(held), n):
                k = policy.hold_off()
        drafting = [c for c in members if k > 0 and c not in held]
        catch_up = joined = 0.0
        if k > 0:
            for c in drafting:
                if queued[c]:
                    seconds = ROW_CATCH_UP_MS * queued[c] / 1e3
                    policy.observe_catch_up(64, queued[c], seconds)
                    if c in fresh and n > 1:
                        joined += seconds
                    else:
                        catch_up += seconds
                queued[c] = 0
        window = policy.heads_window(policy.policy(n), n) if auto else draft_policy.HEADS_WINDOW
        for c in members:
            if c not in drafting:
                queued[c] = min(queued[c] + 1, max(window, queued[c]))
        accepted = {}
        for c in members:
            a = 0
            while c in drafting and a < k and rng.random() < acceptance:
                a += 1
            accepted[c] = a
        ms = step_ms(table, n, k) if len(drafting) == n else step_ms(table, n, 0)
        if drafting and len(drafting) < n:    # the drafting ones' extra rows, and the held ones' call
            ms += (step_ms(table, n, k) - step_ms(table, n, 0)) * len(drafting) / n + step_ms(table, 1, 0)
        seconds = ms / 1e3 * speed * float(rng.lognormal(0.0, noise))
        policy.update(n, k, [accepted[c] for c in drafting], seconds, 64, catch_up, members=members,
                      arrivals=bool(fresh), joined=joined,
                      drafting=len(drafting) if drafting and len(drafting) < n else None)
        elapsed += seconds + catch_up + joined
        if n == clients:
            full += 1
            full_plain += k == 0
        fresh = set()
        for c in members:
            got = min(accepted[c] + 1, left[c])
            tokens += got
            left[c] -= got
            if not left[c]:
                del left[c]
                held.discard(c)         # (the driver's held flag leaves with the sequence)
                if sent[c] < requests:
                    sent[c] += 1
                    waiting[c] = step + 1
    return tokens / elapsed, full_plain / max(full, 1)


def load_policy_module(path: Path):
    spec = importlib.util.spec_from_file_location("pyllama_mtp._baseline_policy", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "pyllama_mtp"
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--acceptance", default="0,0.3,0.6,0.9", help="chance of each draft, given the ones before")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--requests", type=int, default=12, help="requests per client (default 12)")
    ap.add_argument("-n", "--n-gen", type=int, default=64, help="tokens per request (default 64)")
    ap.add_argument("--noise", type=float, default=0.05, help="log-normal sigma of a step's time")
    ap.add_argument("--drift", type=float, default=0.0, help="sigma of the machine's speed, every 100 steps")
    ap.add_argument("--check", default="0,0;0;0;2;0;0",
                    help="the load-time check's drafts accepted per step, texts split by ';' (as traced on "
                         "the Q4_K_M oracle: first drafts accepted 17%%); 'none': no prior")
    ap.add_argument("--costs-from", type=Path, help="a PYLLAMA_MTP_DRAFT_TRACE file: its steady steps' medians")
    ap.add_argument("--baseline", type=Path, help="another draft_policy.py: also run it and print auto / it")
    args = ap.parse_args(argv)
    table = costs_from_trace(args.costs_from) if args.costs_from else TRACED_MS
    check = None if args.check == "none" else [[int(x) for x in t.split(",")] for t in args.check.split(";")]
    base = load_policy_module(args.baseline) if args.baseline else None
    head = "| clients | acceptance | best fixed / plain | auto / plain | auto / best fixed | worst seed / best | plain steps at full batch |"
    print(head + (" auto / baseline |" if base else ""))
    print("|" + " ---: |" * (head.count("|") - 1 + (1 if base else 0)))
    counts = [int(x) for x in args.clients.split(",")]
    for acceptance in [float(x) for x in args.acceptance.split(",")]:
        kw = dict(acceptance=acceptance, requests=args.requests, n_gen=args.n_gen, noise=args.noise,
                  drift=args.drift)

        def serve(module, seed: int) -> list[tuple[float, float]]:
            """One server's policy through the client counts in turn."""
            policy = new_policy(module, check)
            return [run(policy, table, clients=c, rng=np.random.default_rng([seed, 9, c]), module=module, **kw)
                    for c in counts]

        fixed = np.array([[[run(Fixed(k), table, clients=c, rng=np.random.default_rng([s, k, c]), **kw)[0]
                            for k in range(4)] for c in counts] for s in range(args.seeds)])
        auto = [serve(draft_policy, s) for s in range(args.seeds)]
        old = [serve(base, s) for s in range(args.seeds)] if base else None
        for i, clients in enumerate(counts):
            rates = np.array([a[i][0] for a in auto])
            best = fixed[:, i].max(axis=1)
            means = fixed[:, i].mean(axis=0)
            k_best = int(np.argmax(means))
            line = (f"| {clients} | {acceptance:g} | d{k_best} {means[k_best] / means[0]:.2f}x | "
                    f"{rates.mean() / means[0]:.3f}x | {rates.mean() / means[k_best]:.3f}x | "
                    f"{(rates / best).min():.3f}x | {np.mean([a[i][1] for a in auto]):.0%} |")
            if old:
                line += f" {rates.mean() / np.mean([o[i][0] for o in old]):.3f}x |"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
