"""A record of every step ``draft="auto"`` took, for finding out why the policy chose what
it chose on a real run (a server under load, a long context): one JSON object per line.

Set ``PYLLAMA_MTP_DRAFT_TRACE=/path/file.jsonl`` before a ``Llama`` (or the server, or the
bench) is created; every step of its "auto" sequences is appended there. Nothing is
recorded otherwise; recording costs about 0.1 ms a step in Python (on `tiny:step35`,
whose drafting steps take 5-6 ms, a traced generation ran 4% slower than an untraced one
beside it; under 1% of a 15 ms step), so leave it off when measuring speed.

Fields of a line:

- ``trace``: which policy wrote it (each ``Llama``, bench cell or server has its own);
  ``t``: seconds since the trace opened; ``n``: sequences in the step; ``cls``: their size
  class (``draft_policy.size_class``); ``depth``: the deepest context among them;
- ``k``: drafts per sequence; ``s``: the step's seconds (the batched decode alone);
  ``acc``: drafts accepted per sequence; ``catch_up`` / ``joined``: seconds the heads took
  before the step on rows queued by plain decoding / on newcomers' prompts; ``rows``: how
  many rows the heads took in each of those two; ``held``: sequences that decoded plainly
  while the others drafted k (their heads' catch-up would not have paid);
- ``timed``: whether the policy saw the step (plain steps between decisions coast);
  ``same``: the batch held the same sequences as the last timed step and none was new;
- ``best``: the class's decision; ``probe``: the step departs from it to probe or learn;
  ``interval``: steps between probes; ``rates``: expected tokens per second per sequence
  for each length, as the class estimates them now; ``accept``: its acceptance estimate per
  draft position; ``cost``: its predicted seconds of a step per length at this depth, and
  ``samples``: how many steady steps stand behind each; ``stay``: steps the batch usually
  stays in the class; ``switch_in``: the heads' catch-up when drafting starts after plain
  decoding (mean seconds).
"""
from __future__ import annotations

import json
import os
import threading
import time

ENV = "PYLLAMA_MTP_DRAFT_TRACE"


class DraftTrace:
    """Appends step records to one file (line-buffered, safe from several threads)."""

    _opened = 0

    def __init__(self, path: str):
        self.path = path
        DraftTrace._opened += 1
        self.id = DraftTrace._opened      # several policies may append to one file
        self._file = open(path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    @classmethod
    def from_env(cls) -> "DraftTrace | None":
        path = os.environ.get(ENV)
        return cls(path) if path else None

    def write(self, record: dict) -> None:
        record = {"trace": self.id, "t": round(time.perf_counter() - self._t0, 6), **record}
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _r(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(x, digits)


def step_record(policy, n: int, k: int, seconds: float, depth: int, timed: bool, accepted: list[int],
                catch_up: float, joined: float, same_batch: bool, rows_caught=(0, 0), held: int = 0) -> dict:
    """The line for one step of ``policy`` (a BatchDraftPolicy) of n sequences, taken after
    the policy learnt from it."""
    from .draft_policy import size_class
    p = policy.policy(n)
    return {
        "n": n, "cls": size_class(n), "depth": depth, "k": k, "s": _r(seconds), "acc": accepted,
        "catch_up": _r(catch_up), "joined": _r(joined), "rows": list(rows_caught), "held": held,
        "timed": timed, "same": same_batch,
        "best": p._best, "probe": p.probing is not None or p.trial_left > 0 or k != p._best,
        "interval": p.interval,
        "rates": {str(j): round(r, 2) for j, r in p.rates().items()},
        "accept": [round(p.acceptance.rate(i), 3) for i in range(p.draft_max)],
        "cost": {str(j): _r(p.costs.predict(p.bucket, j)) for j in range(p.draft_max + 1)},
        "samples": {str(j): p.costs.samples(p.bucket, j) for j in range(p.draft_max + 1)},
        "stay": _r(p.stay.value, 2), "switch_in": _r(policy.switch_in_cost.value),
    }


def summarize(lines: list[dict]) -> list[dict]:
    """Per trace and size class: steps, tokens and seconds (step plus the heads' catch-ups)
    by draft length, and what the same tokens would have cost decoded plainly at the
    class's median plain step (steps whose batch held still) -- where auto loses to plain
    decoding, and by how much."""
    import statistics
    groups: dict[tuple[int, int], list[dict]] = {}
    for x in lines:
        groups.setdefault((x.get("trace", 0), x["cls"]), []).append(x)
    out = []
    for (trace, cls), xs in sorted(groups.items()):
        plain_n: dict[int, list[float]] = {}         # plain steps whose batch held still, by n
        for x in xs:
            if x["k"] == 0 and x["same"] is not False:
                plain_n.setdefault(x["n"], []).append(x["s"])
        row = {"trace": trace, "cls": cls, "steps": len(xs), "by_k": {}}
        tokens = seconds = 0.0
        for k in sorted({x["k"] for x in xs}):
            ks = [x for x in xs if x["k"] == k]
            tok = sum(x["n"] + sum(x["acc"]) for x in ks)
            sec = sum(x["s"] + x["catch_up"] + x["joined"] for x in ks)
            steady = [x["s"] for x in ks if x["same"]]
            row["by_k"][k] = {"steps": len(ks), "tokens": tok, "seconds": round(sec, 3),
                              "median_step": round(statistics.median(steady), 4) if steady else None,
                              "catch_up": round(sum(x["catch_up"] for x in ks), 3),
                              "joined": round(sum(x["joined"] for x in ks), 3),
                              "mixed": sum(1 for x in ks if k and x.get("held"))}
            tokens += tok
            seconds += sec
        row["tokens"], row["seconds"] = int(tokens), round(seconds, 3)
        if plain_n and seconds:
            # a step that gave each of its n sequences m tokens would have taken m plain
            # steps of n rows (the median plain step of that n, else of the class)
            fallback = statistics.median(s for v in plain_n.values() for s in v)
            as_plain = sum((x["n"] + sum(x["acc"])) / x["n"]
                           * (statistics.median(plain_n[x["n"]]) if x["n"] in plain_n else fallback)
                           for x in xs)
            row["vs_plain"] = round(as_plain / seconds, 3)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m pyllama_mtp.draft_trace",
                                 description="Summarize a PYLLAMA_MTP_DRAFT_TRACE file: per size class, "
                                             "time and tokens by draft length, and auto against plain decoding.")
    ap.add_argument("trace", help="the JSON-lines file")
    args = ap.parse_args(argv)
    with open(args.trace, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    for row in summarize(lines):
        vs = f"  ~{row['vs_plain']:.2f}x plain" if "vs_plain" in row else ""
        print(f"trace {row['trace']} class {row['cls']}: {row['steps']} steps, {row['tokens']} tokens "
              f"in {row['seconds']:.2f} s{vs}")
        for k, c in row["by_k"].items():
            print(f"  k={k}: {c['steps']} steps, {c['tokens']} tokens, {c['seconds']:.2f} s"
                  f" (median steady step {c['median_step']}, catch-up {c['catch_up']} s, joined {c['joined']} s"
                  + (f", {c['mixed']} with held sequences" if c["mixed"] else "") + ")")


if __name__ == "__main__":
    main()
