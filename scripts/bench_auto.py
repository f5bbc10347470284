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

"The best fixed draft" of a round is the fixed length with the best median over the
*other* rounds (leave one round out): picking it by the medians that include the round
it is compared in favours whichever length that round happened to run fast, so a draft
length measured against itself would come out a few percent short of "the best" where
lengths are near ties (selection bias; the in-sample ratio is kept in the JSON as
``auto_over_best_fixed_in_sample``). ``--control`` runs plain decoding and every fixed
length a second time, each as a mode of its own ("0'", "1'", ...), and reports the
copies by the same statistics: plain decoding's copy against plain decoding, and the best
fixed draft's copy against the best fixed draft (what a policy that always decoded
plainly, or always drafted the best length, would score in this cell): the noise floor
of each ratio, beside auto's.

The auto policy lives across rounds, as it does across the calls of one Llama, and starts
fresh for each (depth, length) cell. Greedy, random prompt tokens; the depth is a random
prefix prefilled once and kept (rollback) under each round's prompt.

Targets (issue "draft='auto' never loses"): auto >= 0.97x plain in every cell, and
>= 0.95x the best fixed draft wherever that beats plain by >= 10%.

    python scripts/bench_auto.py -m tiny:step35 -m tiny:step35-random -n 64,192,1024 -d 0,2048
    python scripts/bench_auto.py -m oracle.gguf -n 192 -d 0,2048 --rounds 5 --json out.json
    python scripts/bench_auto.py -m tiny:step35 -n 64 -d 2048 --rounds 9 --control
    python scripts/bench_auto.py -m tiny:step35-a0.6 -n 192 --baseline /tmp/old/draft_policy.py
    python scripts/bench_auto.py -m tiny:step35-a0.6 -n 64 --rounds 20 --breakdown

``--baseline OTHER/draft_policy.py`` runs that version's policy as one more mode
("baseline", seeded alike) in the same rounds: "auto / baseline" is then paired within
rounds too, where two runs of this script minutes apart would mix in the machine's drift.

``--breakdown`` also times every step's decode alone and splits auto's decode time (see
``breakdown``): what its lengths would have cost at the fixed modes' steady step costs,
the extra of its first steps after a change of length (and of each run's first), the
extra of its steady steps over the fixed modes' at the same length and depth, the
heads' catch-ups, and its time between steps (the policy's and the driver's Python)
against the reference's (the best fixed draft where it beats plain decoding, else plain
decoding); so a cell's loss reads as a choice, a price of switching, or bookkeeping.
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


DEPTH_BIN = 64   # tokens of context whose steps --breakdown prices alike


class StepLog:
    """Every decode step of the counted rounds, by mode: (k, the step before's k or None
    at a run's first step, context depth, seconds of the decode alone), and the seconds
    of the heads' catch-ups the driver runs between steps (before drafting after plain
    decoding); installed on a session's ``step_batch`` and ``seq_mtp_catch_up``."""

    def __init__(self, sessions):
        self.mode: str | None = None             # the mode running now (None: not logged)
        self.steps: dict[str, list[tuple[int, int | None, int, float]]] = {}
        self.catch_up: dict[str, float] = {}
        self._last: int | None = None
        for sess in sessions:
            sess.step_batch = self._timed(sess, sess.step_batch)
            sess.seq_mtp_catch_up = self._timed_catch_up(sess.seq_mtp_catch_up)

    def _timed_catch_up(self, catch_up):
        def timed(seq):
            t0 = time.perf_counter()
            catch_up(seq)
            if self.mode is not None:
                self.catch_up[self.mode] = self.catch_up.get(self.mode, 0.0) + time.perf_counter() - t0
        return timed

    def start(self, mode: str | None) -> None:
        """A run of ``mode`` begins (None: a run not to log)."""
        self.mode, self._last = mode, None

    def _timed(self, sess, step_batch):
        def timed(seqs, drafts):
            depth = sess.seq_n_past(seqs[0])
            t0 = time.perf_counter()
            results = step_batch(seqs, drafts)
            seconds = time.perf_counter() - t0
            if self.mode is not None:
                self.steps.setdefault(self.mode, []).append((drafts[0], self._last, depth, seconds))
            self._last = drafts[0]
            return results
        return timed


def breakdown(steps: dict[str, list[tuple]], catch_up: dict[str, float], decode_seconds: dict[str, float],
              reference: str) -> dict:
    """Auto's decode time, split (each part in seconds over all counted rounds):

    - ``priced``: its steps at the fixed modes' steady cost of their length and depth bin
      (the mean of the fixed runs' steps that repeated the step before's length: a mean,
      as the decode times set against each other are sums, stalls included);
    - ``first_steps``: what its first steps after a change of length, and each run's
      first, took beyond that;
    - ``steady_excess``: what its other steps took beyond it (negative: less);
    - ``catch_up``: the heads' catch-ups before its steps that drafted after plain ones;
    - ``between_steps``: the rest of its decode time, outside the steps (the policy's and
      the driver's Python between them).

    ``ref_priced``, ``ref_first_steps``, ``ref_steady_excess`` and ``ref_between_steps``
    are the same of ``reference``, the fixed mode auto is set against (its steady excess
    is about nil: its steps make most of the price). Steps whose length and depth bin no
    fixed mode ran steadily are left out of the prices (``unpriced``). The log's own depth
    lookup before each step (a native call) falls between steps, for every mode alike."""
    ref_samples: dict[tuple[int, int], list[float]] = {}
    for mode, log in steps.items():
        if mode.isdigit():
            for k, before, depth, seconds in log:
                if before == k:
                    ref_samples.setdefault((k, depth // DEPTH_BIN), []).append(seconds)
    ref = {key: statistics.fmean(v) for key, v in ref_samples.items()}

    def split(mode: str) -> dict:
        out = {"priced": 0.0, "first_steps": 0.0, "steady_excess": 0.0, "steps": 0, "unpriced": 0}
        for k, before, depth, seconds in steps.get(mode, []):
            out["steps"] += 1
            price = ref.get((k, depth // DEPTH_BIN))
            if price is None:
                out["unpriced"] += 1
                continue
            out["priced"] += price
            out["first_steps" if before != k else "steady_excess"] += seconds - price
        out["catch_up"] = catch_up.get(mode, 0.0)
        out["between_steps"] = decode_seconds[mode] - sum(s[3] for s in steps.get(mode, [])) - out["catch_up"]
        return out

    auto, ref = split("auto"), split(reference)
    return {**auto, "reference": reference, "ref_priced": ref["priced"], "ref_first_steps": ref["first_steps"],
            "ref_steady_excess": ref["steady_excess"], "ref_between_steps": ref["between_steps"],
            "ref_steps": ref["steps"], "decode_seconds": decode_seconds["auto"],
            "ref_decode_seconds": decode_seconds[reference]}


def run_cell(path: str, depth: int, n_gen: int, rounds: int, threads: int, seed: int, control: bool = False,
             baseline=None, log_steps: bool = False) -> dict:
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
            check = check_session(s).seed
            policies = {"auto": BatchDraftPolicy(s.draft_max)}
            if baseline is not None:
                policies["baseline"] = baseline.BatchDraftPolicy(s.draft_max)
            for policy in policies.values():
                policy.seed(check)                          # as a Llama does at load: "auto" starts from it
            modes: list = list(range(s.draft_max + 1)) + list(policies)
            if control:
                modes += [copy_name(k) for k in range(s.draft_max + 1)]
            rates: dict = {m: [] for m in modes}
            chosen: dict[int, int] = {}
            log = StepLog((s, without_heads)) if log_steps else None
            decode_seconds: dict[str, float] = {str(m): 0.0 for m in modes}
            tokens: dict[str, int] = {str(m): 0 for m in modes}
            for r in range(rounds + 1):                     # round 0 warms up and is not counted
                order = modes[r % len(modes):] + modes[:r % len(modes)]
                prompt = [int(t) for t in rng.integers(3, n_vocab - 8, size=8)]
                for mode in order:
                    # the library's driver, one sequence, no text; the prefix stays in the cache;
                    # max_tokens as a generate call would pass it (auto weighs it)
                    draft = "auto" if mode in policies else int(str(mode).rstrip("'"))
                    sess = without_heads if draft == 0 else s
                    seq = Sequence(0, PreparedCall(prefix + prompt, n_gen, SamplingParams(), draft, ()), None,
                                   held.get(id(sess), []))
                    seq.load(sess)
                    seq.prefill(sess)
                    seq.begin(sess)
                    if log is not None:
                        log.start(str(mode) if r else None)
                    t0 = time.perf_counter()
                    while seq.n_generated < n_gen:
                        step_sequences(sess, [seq], policies.get(mode))
                        if mode == "auto" and r:
                            chosen[seq.last_k] = chosen.get(seq.last_k, 0) + 1
                    if r:
                        seconds = time.perf_counter() - t0
                        rates[mode].append((seq.n_generated - 1) / seconds)
                        decode_seconds[str(mode)] += seconds
                        tokens[str(mode)] += seq.n_generated - 1
                    held[id(sess)] = seq.cached(sess.seq_n_past(0))
    cell = summarise({str(m): v for m, v in rates.items()}, depth, n_gen, chosen)
    if log is not None:
        # what auto is judged against: the best fixed draft where it beats plain decoding
        ref = str(cell["best_fixed"]) if cell["best_fixed_over_plain"] > 1 else "0"
        cell["breakdown"] = {**breakdown(log.steps, log.catch_up, decode_seconds, ref),
                             "tokens": tokens["auto"], "ref_tokens": tokens[ref]}
    return cell


def copy_name(k: int | str) -> str:
    """The control mode that runs fixed draft k a second time."""
    return f"{k}'"


def paired(rates: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of mode a's speed over mode b's in the same round."""
    return statistics.median(x / y for x, y in zip(rates[a], rates[b]))


def fixed_modes(rates: dict[str, list[float]]) -> list[str]:
    """The fixed draft lengths (not plain decoding, auto or a control copy)."""
    return [m for m in rates if m.isdigit() and m != "0"]


def best_fixed_in_sample(rates: dict[str, list[float]]) -> str:
    """The fixed length with the best median over all rounds."""
    return max(fixed_modes(rates), key=lambda m: statistics.median(rates[m]))


def over_best_fixed(rates: dict[str, list[float]], mode_for=lambda best: "auto") -> float:
    """Median over rounds of a mode's speed over the best fixed draft's in the same round,
    the best picked by its median over the other rounds (a single round: over all);
    ``mode_for(best)`` names the mode set against it (auto, or the best length's copy)."""
    n = len(rates["0"])
    ratios = []
    for r in range(n):
        others = {m: statistics.median(rates[m][:r] + rates[m][r + 1:] if n > 1 else rates[m])
                  for m in fixed_modes(rates)}
        best = max(others, key=others.get)
        ratios.append(rates[mode_for(best)][r] / rates[best][r])
    return statistics.median(ratios)


def summarise(rates: dict[str, list[float]], depth: int, n_gen: int, chosen: dict[int, int]) -> dict:
    """One cell's figures from each mode's per-round speeds (keys: "0", "1", ..., "auto",
    and the control copies "1'", ... where they ran)."""
    best = best_fixed_in_sample(rates)
    plain = rates["0"]
    cell = {"depth": depth, "n_gen": n_gen, "tok_s": {m: statistics.median(v) for m, v in rates.items()},
            "per_round": rates, "auto_chose": chosen,
            "noise": (max(plain) - min(plain)) / statistics.median(plain),
            "auto_over_plain": paired(rates, "auto", "0"), "best_fixed": int(best),
            "best_fixed_over_plain": paired(rates, best, "0"),
            "auto_over_best_fixed": over_best_fixed(rates),
            "auto_over_best_fixed_in_sample": paired(rates, "auto", best)}
    if "baseline" in rates:
        cell["auto_over_baseline"] = paired(rates, "auto", "baseline")
        cell["baseline_over_plain"] = paired(rates, "baseline", "0")
    if copy_name(0) in rates:
        cell["control_over_plain"] = paired(rates, copy_name(0), "0")
        cell["control_over_best_fixed"] = over_best_fixed(rates, copy_name)
    return cell


def verdict(cell: dict, who: str = "auto") -> list[str]:
    """The targets ``who`` misses in this cell: "auto", or "control" (the copies of plain
    decoding and of the best fixed draft, each against its original)."""
    over_plain, over_best = (cell["auto_over_plain"], cell["auto_over_best_fixed"]) if who == "auto" else \
        (cell["control_over_plain"], cell["control_over_best_fixed"])
    misses = []
    if over_plain < 0.97:
        misses.append(f"{who} < 0.97x plain")
    if cell["best_fixed_over_plain"] >= 1.10 and over_best < 0.95:
        misses.append(f"{who} < 0.95x the best fixed draft")
    return misses


def breakdown_row(b: dict) -> dict:
    """A cell's breakdown as the table shows it: ``choice``: auto's lengths at the fixed
    modes' step costs, in tokens per second over the reference's at the same costs (the
    best fixed draft where it beats plain decoding, else plain decoding);
    ``first_steps`` / ``steady_steps`` / ``catch_up``: the extra of its first and of its
    steady steps, and the heads' catch-ups, as shares of auto's decode time;
    ``between_steps``: the share of auto's and of the reference's decode time spent
    between steps, and per step in microseconds."""
    d, d_ref = b["decode_seconds"], b["ref_decode_seconds"]
    choice = (b["tokens"] / b["priced"]) / (b["ref_tokens"] / b["ref_priced"]) \
        if b["priced"] and b["ref_priced"] else float("nan")
    return {"choice": choice, "first_steps": b["first_steps"] / d, "steady_steps": b["steady_excess"] / d,
            "catch_up": b["catch_up"] / d,
            "between_steps": b["between_steps"] / d, "ref_between_steps": b["ref_between_steps"] / d_ref,
            "between_us": 1e6 * b["between_steps"] / max(b["steps"], 1),
            "ref_between_us": 1e6 * b["ref_between_steps"] / max(b["ref_steps"], 1),
            "unpriced": b["unpriced"]}


def print_breakdowns(cells: list[dict]) -> None:
    print("\nWhere auto's time went (--breakdown), against the reference (the best fixed draft where it beats "
          "plain decoding, else plain decoding): auto's lengths priced at the fixed modes' steady step costs "
          "(tok/s over the reference's at the same costs), the extra of its first steps after a change of length "
          "and of its steady steps, the heads' catch-ups (shares of its decode time), and the rest of the time "
          "between steps\n")
    print("| model | depth | tokens | reference | auto / reference | lengths chosen, at fixed costs | first steps | "
          "steady steps | catch-ups | between steps: auto | reference |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for cell in cells:
        b = cell["breakdown"]
        row = breakdown_row(b)
        plain = b["reference"] == "0"
        unpriced = f" ({row['unpriced']} steps unpriced)" if row["unpriced"] else ""
        print(f"| {cell['model']} | {cell['depth']} | {cell['n_gen']} | {'plain' if plain else 'd' + b['reference']} | "
              f"{cell['auto_over_plain' if plain else 'auto_over_best_fixed']:.2f}x | "
              f"{row['choice']:.3f}x{unpriced} | {100 * row['first_steps']:+.1f}% | {100 * row['steady_steps']:+.1f}% | "
              f"{100 * row['catch_up']:.1f}% | {100 * row['between_steps']:.1f}% ({row['between_us']:.0f} us/step) | "
              f"{100 * row['ref_between_steps']:.1f}% ({row['ref_between_us']:.0f} us/step) |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", action="append", required=True, help="GGUF path or built-in name (repeatable)")
    ap.add_argument("-n", "--n-gen", default="64,192", help="generated tokens per run (default 64,192)")
    ap.add_argument("-d", "--depth", default="0", help="context depths (default 0)")
    ap.add_argument("--rounds", type=int, default=7, help="counted rounds per cell (default 7)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control", action="store_true",
                    help="run plain decoding and every fixed draft twice, and report the copies as auto is")
    ap.add_argument("--baseline", type=Path, help="another draft_policy.py: run it as a mode of its own, "
                                                  "and print auto / it")
    ap.add_argument("--breakdown", action="store_true",
                    help="time every step too, and split auto's time: its lengths at the fixed modes' costs, "
                         "its switches, its steady steps, its time between steps")
    ap.add_argument("--json", type=Path, help="also write the cells here")
    args = ap.parse_args(argv)
    from pyllama_mtp.bench.builtin import resolve
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from simulate_server_auto import load_policy_module
    baseline = load_policy_module(args.baseline) if args.baseline else None

    out = {"cpu": cpu_name(), "gpu": accelerators(), "threads": args.threads, "rounds": args.rounds, "cells": []}
    where = f"every layer on {out['gpu']}, host CPU {out['cpu']}" if out["gpu"] else f"CPU: {out['cpu']}"
    print(f"{where}, {args.threads} threads, median of {args.rounds} interleaved rounds; ratios paired within rounds\n")
    ctl_head = (" control: copy / plain | copy / best fixed |", " ---: | ---: |") if args.control else ("", "")
    if baseline is not None:
        ctl_head = (ctl_head[0] + " baseline / plain | auto / baseline |", ctl_head[1] + " ---: | ---: |")
    print("| model | depth | tokens | plain tok/s | noise | best fixed | auto tok/s | auto / plain | auto / best fixed |"
          f"{ctl_head[0]} auto chose |")
    print(f"| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |{ctl_head[1]} --- |")
    failed = control_failed = 0
    for name in args.model:
        path = resolve(name) if name.startswith("tiny:") else name
        for depth in (int(x) for x in args.depth.split(",")):
            for n_gen in (int(x) for x in args.n_gen.split(",")):
                cell = run_cell(path, depth, n_gen, args.rounds, args.threads, args.seed, args.control, baseline,
                                args.breakdown)
                cell["model"] = name
                cell["missed"] = verdict(cell)
                failed += bool(cell["missed"])
                ctl = ""
                if args.control:
                    cell["control_missed"] = verdict(cell, "control")
                    control_failed += bool(cell["control_missed"])
                    ctl = f" {cell['control_over_plain']:.2f}x | {cell['control_over_best_fixed']:.2f}x |"
                if baseline is not None:
                    ctl += f" {cell['baseline_over_plain']:.2f}x | {cell['auto_over_baseline']:.2f}x |"
                out["cells"].append(cell)
                med = cell["tok_s"]
                total = sum(cell["auto_chose"].values()) or 1
                mix = ", ".join(f"{k}: {100 * v / total:.0f}%" for k, v in sorted(cell["auto_chose"].items()))
                missed = cell["missed"] + cell.get("control_missed", [])
                print(f"| {name} | {depth} | {n_gen} | {med['0']:.1f} | {100 * cell['noise']:.0f}% | d{cell['best_fixed']} "
                      f"{cell['best_fixed_over_plain']:.2f}x | {med['auto']:.1f} | {cell['auto_over_plain']:.2f}x | "
                      f"{cell['auto_over_best_fixed']:.2f}x |{ctl} {mix}{' **' + '; '.join(missed) + '**' if missed else ''} |",
                      flush=True)
    if args.breakdown:
        print_breakdowns(out["cells"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(f"\n{len(out['cells']) - failed} of {len(out['cells'])} cells meet the targets")
    if args.control:
        print(f"the control copies (plain decoding's and the best fixed draft's, each against its original) "
              f"meet them in {len(out['cells']) - control_failed} of {len(out['cells'])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
