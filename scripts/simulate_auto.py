"""draft="auto" on simulated step costs: its speed over plain decoding and over the best
fixed draft length, free of the machine's noise.

On a shared 2-core VM a decode's speed drifts by 10-40% between rounds, more than most
changes to the policy move it; this runs the policy (pyllama_mtp.draft_policy) against
step costs and acceptance rates measured on real models, with noise of a chosen size
added to every step (log-normal, plus a share of steps stalled), a switch of length
costing extra, and every fixed length run under the same noise. Each case runs a warm-up
generation and then the measured one with the same policy (as the calls of one Llama do;
``--calls N``: N measured ones, as a server's or a bench's long-lived policy sees them).
Figures are means over seeds: "auto / best fixed" and "auto / plain" per case and length;
"worst 5%": the 5th percentile over seeds of auto / plain with both run on the same
machine's noise (a policy that now and then sticks to a losing length shows there, not
in a mean).

    python scripts/simulate_auto.py
    python scripts/simulate_auto.py --seeds 48 --noise 0.15 --stall 0.05 -n 64,192,1024
    python scripts/simulate_auto.py --case a0.6 --calls 8 -n 192
    python scripts/simulate_auto.py --baseline /tmp/old/draft_policy.py   # A/B two policies
    python scripts/simulate_auto.py --spells 0.01 --calls 6 -n 128        # a busy neighbour's spells
    python scripts/simulate_auto.py --walk 0.02 --calls 6 -n 192          # slower minutes that build up
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pyllama_mtp.draft_policy import DraftPolicy  # noqa: E402
from simulate_server_auto import load_policy_module  # noqa: E402

# name -> (seconds of a step with k drafts, relative; acceptance of draft positions 1..3).
# Averages of steady steps measured on the 2-core AMD EPYC Zen 3 VM (2 threads) with
# scripts/bench_auto.py's models, and a 2 GB Q4_K_M oracle measured on Zen 4 and on an Intel
# Xeon with AMX (steps from scripts/bench_vs_upstream.py's tok/s at acceptance 1.0: there a
# verify costs less against a decode, so the longest draft wins by more).
CASES = {
    "tiny:step35, depth 0": ({0: 3.9, 1: 6.2, 2: 7.5, 3: 9.0}, [0.9, 0.85, 0.9]),
    "tiny:step35, depth 2048": ({0: 5.73, 1: 8.98, 2: 11.92, 3: 15.14}, [0.9, 0.85, 0.9]),
    "tiny:step35-a0.6": ({0: 4.41, 1: 5.54, 2: 6.56, 3: 8.07}, [0.55, 0.57, 0.62]),
    # Intel Xeon without AMX (AVX-512 VNNI/VBMI), 2 threads: steady steps of an auto trace
    "tiny:step35-a0.6, Intel no AMX": ({0: 4.07, 1: 5.01, 2: 5.9, 3: 6.6}, [0.59, 0.61, 0.55]),
    # AMD EPYC Zen 4 (AVX-512, no AMX), 2 threads: steady steps' medians of draft lengths
    # taking turns in one session (a verify costs more against a decode here: drafting 1-2
    # win 10-14%, and a dip of the acceptance estimate turns plain decoding ahead on paper)
    "tiny:step35-a0.6, AMD Zen 4": ({0: 2.42, 1: 3.45, 2: 4.51, 3: 5.22}, [0.59, 0.62, 0.65]),
    # the 0.7 GB Q4_K_M acceptance-0.6 oracle after 2,048 tokens, Intel Xeon without AMX:
    # steady steps' medians of an auto trace (drafting 1 wins by about 12%)
    "0.7 GB Q4_K_M oracle, depth 2048, Intel no AMX": ({0: 10.3, 1: 14.9, 2: 18.7, 3: 23.3}, [0.63, 0.6, 0.7]),
    # the 0.7 GB F16 acceptance-0.6 oracle after 2,048 tokens, same CPU: steady steps of an
    # auto trace; drafts 1-3 within 2% of each other, all about 1.2x plain
    "0.7 GB F16 oracle, depth 2048, Intel no AMX": ({0: 22.6, 1: 30.3, 2: 37.5, 3: 42.2}, [0.58, 0.71, 0.6]),
    "2 GB Q4_K_M oracle": ({0: 1.0, 1: 1.77, 2: 2.39, 3: 3.05}, [1.0, 1.0, 1.0]),
    "2 GB Q4_K_M oracle, Intel AMX": ({0: 1.0, 1: 1.58, 2: 1.89, 3: 2.33}, [1.0, 1.0, 1.0]),
    "drafts never accepted": ({0: 1.0, 1: 1.6, 2: 2.2, 3: 2.8}, [0.0, 0.0, 0.0]),
    "drafting barely pays": ({0: 1.0, 1: 1.45, 2: 1.9, 3: 2.4}, [0.55, 0.5, 0.5]),
    "drafting barely loses": ({0: 1.0, 1: 1.45, 2: 1.9, 3: 2.4}, [0.38, 0.4, 0.4]),
    "cheap drafts, acceptance 0.3": ({0: 4.41, 1: 5.54, 2: 6.56, 3: 8.07}, [0.3, 0.3, 0.3]),
    "cheap drafts, acceptance 0.1": ({0: 4.41, 1: 5.54, 2: 6.56, 3: 8.07}, [0.1, 0.1, 0.1]),
}


class Fixed:
    """A policy that always drafts k (the baselines)."""

    def __init__(self, k: int):
        self.k = k

    def start_sequence(self) -> None:
        pass

    def choose(self, depth: int = 0) -> int:
        return self.k

    def update(self, *args, **kwargs) -> None:
        pass


def tokens_per_second(policy, costs: dict[int, float], accept: list[float], n_gen: int, rng,
                      noise: float, stall: float, switch: float, drift: float = 0.0,
                      cold: bool = False, catch_up: float = 0.0, machine=None, calls: int = 1,
                      spells: float = 0.0, spell_steps: float = 15.0, walk: float = 0.0) -> float:
    """A warm-up generation, then ``calls`` measured ones, of n_gen tokens each (``cold``: the
    measured ones only, the policy new: a Llama's first call). ``drift``: the
    machine's speed changes now and then (every ~100 steps on average) by a log-normal
    factor of this sigma, as a shared VM's does when its neighbours get busy. ``catch_up``:
    plain steps' worth of time the MTP heads take before a step that drafts right after
    plain decoding (the rows kept while decoding plainly, BatchDraftPolicy.heads_window).
    ``spells``: the chance per step that a slow spell begins (a neighbour's burst on a shared
    VM: every step 1.5-3x slower, for ``spell_steps`` steps on average).
    ``walk``: the machine's log speed also wanders from step to step (a random walk of this
    sigma per step, pulled back toward 1.0 over about 100 steps), the slower minutes that
    build up over a few dozen steps on a shared VM.
    ``machine``: a generator of its own for the machine's noise, stalls and drift (default:
    ``rng``, which also draws acceptance), so that two policies run on one seed meet the
    same machine at the same step whatever they draft."""
    machine = rng if machine is None else machine
    speed, spell_left, spell_factor, wander = 1.0, 0, 1.0, 0.0
    total_tokens = total_seconds = 0.0
    for measured in ((True,) * calls if cold else (False,) + (True,) * calls):
        policy.start_sequence()
        tokens = seconds = 0.0
        last = None
        while tokens < n_gen:
            k = policy.choose(int(tokens))
            n_acc = 0
            while n_acc < k and rng.random() < accept[n_acc]:
                n_acc += 1
            if drift and machine.random() < 0.01:
                speed = float(np.exp(machine.normal(0.0, drift)))
            if spells and machine.random() < spells:
                spell_left = int(machine.geometric(1.0 / spell_steps))
                spell_factor = float(np.exp(machine.uniform(np.log(1.5), np.log(3.0))))
            if walk:
                wander = 0.99 * wander + machine.normal(0.0, walk)
            slow = (spell_factor if spell_left > 0 else 1.0) * float(np.exp(wander))
            spell_left -= 1
            t = slow * speed * costs[k] * float(np.exp(machine.normal(0.0, noise))) * (1.8 if machine.random() < stall else 1.0)
            if k != last:
                t += switch * costs[0]         # graphs rebuilt, caches cold
            heads = slow * speed * catch_up * costs[0] if k > 0 and last == 0 else 0.0
            policy.update(k, n_acc, t, int(tokens), heads)
            tokens += n_acc + 1
            seconds += t + heads
            last = k
        if measured:
            total_tokens, total_seconds = total_tokens + tokens, total_seconds + seconds
    return total_tokens / total_seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--n-gen", default="64,192,1024", help="generated tokens (default 64,192,1024)")
    ap.add_argument("--seeds", type=int, default=24)
    ap.add_argument("--noise", type=float, default=0.15, help="log-normal sigma of a step's time (default 0.15)")
    ap.add_argument("--stall", type=float, default=0.05, help="share of steps slowed 1.8x (default 0.05)")
    ap.add_argument("--switch", type=float, default=0.4, help="extra cost of a change of length, in plain steps")
    ap.add_argument("--drift", type=float, default=0.15,
                    help="sigma of the machine's speed changes, every ~100 steps (default 0.15)")
    ap.add_argument("--spells", type=float, default=0.0,
                    help="chance per step of a slow spell, 1.5-3x for --spell-steps steps (default 0: none)")
    ap.add_argument("--spell-steps", type=float, default=15.0, help="mean length of a slow spell, in steps")
    ap.add_argument("--walk", type=float, default=0.0,
                    help="sigma per step of a random walk of the machine's log speed (default 0: none)")
    ap.add_argument("--cold", action="store_true", help="no warm-up generation: the policy starts new")
    ap.add_argument("--calls", type=int, default=1,
                    help="measured generations per seed, one policy across them (default 1)")
    ap.add_argument("--case", action="append", help="only the cases whose name holds this (repeatable)")
    ap.add_argument("--catch-up", type=float, default=4.0,
                    help="the heads' catch-up before drafting after plain decoding, in plain steps (default 4)")
    ap.add_argument("--baseline", type=Path, help="another draft_policy.py: also run it on the same seeds "
                                                  "and print auto / it")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.n_gen.split(",")]
    base = load_policy_module(args.baseline) if args.baseline else None
    print("| case | tokens | best fixed / plain | auto / plain | auto / best fixed | auto / plain, worst 5% |"
          + (" auto / baseline |" if base else ""))
    print("| --- | ---: | --- | ---: | ---: | ---: |" + (" ---: |" if base else ""))
    for name, (costs, accept) in CASES.items():
        if args.case and not any(c in name for c in args.case):
            continue
        for n_gen in lengths:
            def rates(make) -> np.ndarray:
                return np.array([tokens_per_second(make(), costs, accept, n_gen, np.random.default_rng([s, 0]),
                                                   args.noise, args.stall, args.switch, args.drift,
                                                   args.cold, args.catch_up, np.random.default_rng([s, 1]),
                                                   args.calls, args.spells, args.spell_steps, args.walk)
                                 for s in range(args.seeds)])
            fixed = [rates(lambda k=k: Fixed(k)) for k in range(4)]
            auto = rates(lambda: DraftPolicy(3))
            means = [float(f.mean()) for f in fixed]
            best = int(np.argmax(means))
            worst = float(np.percentile(auto / fixed[0], 5))
            line = (f"| {name} | {n_gen} | d{best} {means[best] / means[0]:.2f}x | {auto.mean() / means[0]:.2f}x | "
                    f"{auto.mean() / means[best]:.2f}x | {worst:.2f}x |")
            if base:
                line += f" {auto.mean() / rates(lambda: base.DraftPolicy(3)).mean():.3f}x |"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
