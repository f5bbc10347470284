#!/usr/bin/env python3
"""Load benchmark of pyllama-mtp-server: aggregate and per-stream tokens per second with
1, 2, 4, 8 concurrent clients, MTP off vs on, on one oracle step35 GGUF.

A real server runs on 127.0.0.1 with --parallel equal to the largest client count; every
client is the official `openai` client sending greedy completion requests one after
another (random prompt token ids, one prompt per client and request). For each count of
clients the script reports

  * aggregate tok/s: completion tokens of every request / wall time of the round,
  * per-stream tok/s: the mean over requests of completion tokens / request latency,

for MTP off (plain decoding, every slot batched) and MTP on (--mtp --draft DRAFT; "auto"
lets the server drop drafting at a concurrency where it does not pay; "--draft 3,auto"
runs one server per setting), and the single-stream speedup of the library itself
(Llama.generate, the first draft setting vs plain) to compare with the server's at 1
client. All servers are up at once and take turns at each client count, so the machine's
drift over the run hits every setting alike; with --server-rounds R they take R turns each,
in a rotating order, and a ratio is the median of the R per-round ratios.

    python scripts/bench_server_load.py --size-gb 2.2 --acceptance 0.9 -t 2 -n 128

--prefix-tokens N puts a context of N tokens (the same for every request, as a long
document or chat history) before each request's own 16 tokens; every slot prefills it
and runs one whole request on it before the rounds, so the rounds measure decoding at
that depth (prefix reuse in both servers):

    python scripts/bench_server_load.py --model M --clients 1,4,8 --prefix-tokens 2048 --upstream

--chaos runs the hostile-load check of scripts/server_chaos.py instead (64 clients x 20
requests, 20% leaving early, 10% malformed; exactness, 5xx, recovery and RSS):

    python scripts/bench_server_load.py --chaos --model M -t 2

--control runs a second MTP-off server, taking its turns like the others, and prints its
copy over the first per client count: the noise floor of every ratio at that count and
round count (two servers that decode alike differ by this much by chance), to tell a
setting's loss of a few percent from the machine's:

    python scripts/bench_server_load.py --model M --clients 1,2,4 --draft 1,auto --prefix-tokens 2048 \
        --server-rounds 5 --no-library --control

--upstream also runs upstream's llama-server (built by scripts/build_upstream.sh from the
same pinned tree without our patches: its batched kernels) with -np equal to the largest
client count, plain and with --spec-type draft-mtp, under the same load, and prints ours
over upstream per client count.

--compare-lib DIR runs every one of our setups a second time on another build of the
library (DIR as PYLLAMA_MTP_LIB_DIR takes it: libpmtp and the llama.cpp libraries beside
pmtp.h), in the same rounds, and prints that build over this one per client count: an A/B
of a change to the C side under the server's load, e.g. against the installed build:

    python scripts/bench_server_load.py --model M --clients 4,8 --prefix-tokens 2048 \
        --server-rounds 4 --no-library --compare-lib build/py3-none-linux_x86_64/bin
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# where scripts/build_upstream.sh put upstream's tools (UPSTREAM_BUILD, as for that script)
UPSTREAM_BIN = ROOT / os.environ.get("UPSTREAM_BUILD", "build/upstream") / "bin"


def ensure_model(path: Path, size_gb: float, acceptance: float) -> Path:
    if not path.exists():
        from pyllama_mtp import tiny_models as testing
        testing.write_step35(path, oracle=True, acceptance=acceptance, seed=1,
                             **testing.oracle_size_for(size_gb * 1e9))
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB)", file=sys.stderr)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """pyllama-mtp-server (or, with upstream=True, upstream's llama-server) in a subprocess,
    up until closed."""

    def __init__(self, model: Path, threads: int, parallel: int, n_ctx: int, mtp_draft: str | None,
                 upstream: bool = False, lib_dir: str | None = None):
        import httpx
        self.port = free_port()
        if upstream:
            cmd = [str(UPSTREAM_BIN / "llama-server"), "-m", str(model), "--port",
                   str(self.port), "--host", "127.0.0.1", "-t", str(threads), "-np", str(parallel),
                   "-c", str(n_ctx * parallel), "--alias", "bench", "--no-webui"]
            if mtp_draft is not None:
                cmd += ["--spec-type", "draft-mtp", "--spec-draft-n-max", mtp_draft, "--spec-draft-n-min", "0",
                        "--spec-draft-p-min", "0"]
        else:
            cmd = [sys.executable, "-m", "pyllama_mtp.server.cli", "--model", str(model), "--port", str(self.port),
                   "--threads", str(threads), "--parallel", str(parallel), "--n-ctx", str(n_ctx), "--alias", "bench"]
            if mtp_draft is not None:
                cmd += ["--mtp", "--draft", mtp_draft]
        # its log goes to a file: a pipe nobody reads would block the server once full
        import tempfile
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench-server-", suffix=".log", delete=False)
        env = dict(os.environ, PYLLAMA_MTP_LIB_DIR=lib_dir) if lib_dir else None   # (--compare-lib)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True, env=env)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_tail()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.close()
        raise RuntimeError("server did not come up within 10 minutes")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 2000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def shared_prefix(n_tokens: int, n_vocab: int) -> list[int]:
    """The context every request of a --prefix-tokens run starts with (a long document or
    chat history that each slot keeps in its KV cache), the same for every server."""
    rng = np.random.default_rng(4242)
    return [int(t) for t in rng.integers(3, n_vocab - 8, size=n_tokens)]


def one_round(client, clients: int, requests: int, n_gen: int, n_vocab: int, seed: int,
              prefix: list[int] = ()) -> dict:
    """clients threads, each sending `requests` completions in turn; tokens and latencies.
    Every prompt is `prefix` and then 16 tokens of its own."""
    rng = np.random.default_rng(seed)
    prompts = [[list(prefix) + [int(t) for t in rng.integers(3, n_vocab - 8, size=16)] for _ in range(requests)]
               for _ in range(clients)]

    def run(mine):
        out = []
        for prompt in mine:
            t0 = time.perf_counter()
            r = client.completions.create(model="bench", prompt=prompt, max_tokens=n_gen, temperature=0)
            out.append((r.usage.completion_tokens, time.perf_counter() - t0))
        return out

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(run, prompts) for x in part]
    wall = time.perf_counter() - t0
    tokens = sum(n for n, _ in results)
    return {"aggregate_tps": tokens / wall, "per_stream_tps": statistics.mean(n / t for n, t in results),
            "tokens": tokens, "wall_s": wall}


def bench_servers(model: Path, args, setups: dict[str, tuple]) -> dict[str, dict[int, dict]]:
    """Every setup (name -> (MTP draft or None, upstream?[, library folder])) as its own
    server, all up at once (an idle server costs nothing); for each client count the setups
    take turns, so the machine's drift over the run hits them alike. Figures per setup and
    client count."""
    import openai
    from pyllama_mtp.engine import Model
    from pyllama_mtp.config import ModelConfig
    with Model(ModelConfig(str(model), load_mtp=False, use_mmap=True)) as m:
        n_vocab = m.info.n_vocab
    servers: dict[str, Server] = {}
    try:
        for name, (draft, upstream, *lib_dir) in setups.items():
            servers[name] = Server(model, args.threads, max(args.clients), args.n_ctx, draft, upstream, *lib_dir)
        def client(name: str):
            # a new client (and connection pool) for each round: a server may close a
            # connection left idle while the others take their turns (upstream's does after
            # a few seconds), and a request sent on it would fail
            return openai.OpenAI(base_url=f"{servers[name].base}/v1", api_key="none", max_retries=0, timeout=3600)

        prefix = shared_prefix(args.prefix_tokens, n_vocab) if args.prefix_tokens else []
        for name in servers:
            one_round(client(name), 1, 1, 16, n_vocab, seed=999)                # warm-up
            if prefix:
                # every slot prefills the shared context once, all at the same time (each
                # request finds the other slots busy), and runs a whole request on it (an MTP
                # server's heads take the context at its first draft), so that the rounds
                # measure decoding at that depth rather than prefill
                one_round(client(name), max(args.clients), 1, args.n_gen, n_vocab, seed=998, prefix=prefix)
        out: dict[str, dict[int, dict]] = {name: {} for name in setups}
        names = list(servers)
        for c in args.clients:
            runs: dict[str, list[dict]] = {name: [] for name in names}
            for r in range(args.server_rounds):
                # each round in another order, so that no setup always runs first (or last)
                for name in names[r % len(names):] + names[:r % len(names)]:
                    runs[name].append(one_round(client(name), c, args.requests, args.n_gen, n_vocab,
                                                 seed=c + 1000 * r, prefix=prefix))
            for name in names:
                out[name][c] = summarize(runs[name])
        return out
    finally:
        for srv in servers.values():
            srv.close()


def summarize(runs: list[dict]) -> dict:
    """One setup at one client count over the rounds: medians, and each round's aggregate
    (for ratios paired within a round, see ``ratio``)."""
    return {"aggregate_tps": statistics.median(r["aggregate_tps"] for r in runs),
            "per_stream_tps": statistics.median(r["per_stream_tps"] for r in runs),
            "rounds": [r["aggregate_tps"] for r in runs],
            "tokens": sum(r["tokens"] for r in runs), "wall_s": sum(r["wall_s"] for r in runs)}


def ratio(a: dict, b: dict) -> float:
    """Aggregate a over b: the median of the per-round ratios (the setups of one round ran
    within seconds of each other; a shared machine drifts by 10-25% over minutes)."""
    return statistics.median(x / y for x, y in zip(a["rounds"], b["rounds"]))


def ratio_text(a: dict, b: dict) -> str:
    """``ratio`` with the spread of the per-round ratios when there are several."""
    each = [x / y for x, y in zip(a["rounds"], b["rounds"])]
    spread = f" ({min(each):.2f}-{max(each):.2f})" if len(each) > 1 else ""
    return f"{statistics.median(each):.2f}x{spread}"


def library_speedup(model: Path, args) -> dict:
    """Single-stream tok/s of the library itself, plain vs MTP (median of rounds), counted
    like the server's per-stream figure: generated tokens over the whole call's wall time
    (prompt included)."""
    from pyllama_mtp import Llama
    rng = np.random.default_rng(0)
    draft = args.draft if args.draft == "auto" else int(args.draft)
    rates = {"off": [], "on": []}
    with Llama(str(model), mtp=True, draft=draft, n_ctx=args.n_ctx, threads=args.threads) as llm:
        llm.generate([5, 6, 7], max_tokens=8)
        for _ in range(args.rounds):
            prompt = [int(t) for t in rng.integers(3, llm.info.n_vocab - 8, size=16)]
            for mode, k in (("off", 0), ("on", draft)):
                llm.reset()            # no prefix reuse: every call prefills, as the server does
                t0 = time.perf_counter()
                n = len(llm.generate(prompt, max_tokens=args.n_gen, draft=k).tokens)
                rates[mode].append(n / (time.perf_counter() - t0))
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    return {"plain_tps": off, "mtp_tps": on, "speedup": on / off if off else 0.0}


def table(off: dict, on: dict[str, dict], lib: dict | None, control: dict | None = None) -> str:
    """MTP off, then each draft setting's aggregate and per-stream tok/s and its gain; with
    ``control`` (a second MTP-off server), its copy over the first: the ratios' noise floor."""
    head = "| clients | MTP off aggregate | MTP off per stream |"
    rule = "| ------: | ----------------: | -----------------: |"
    for d in on:
        head += f" draft {d} aggregate | draft {d} per stream | {d} / off |"
        rule += " ------: | ------: | ------: |"
    if control:
        head += " control: off copy / off |"
        rule += " ------: |"
    lines = [head, rule]
    for c in sorted(off):
        a = off[c]
        row = f"| {c} | {a['aggregate_tps']:.2f} | {a['per_stream_tps']:.2f} |"
        for figures in on.values():
            b = figures[c]
            row += f" {b['aggregate_tps']:.2f} | {b['per_stream_tps']:.2f} | {ratio_text(b, a)} |"
        if control:
            row += f" {ratio_text(control[c], a)} |"
        lines.append(row)
    if lib:
        first = next(iter(on.values()))
        lines.append("")
        lines.append(f"library single stream: plain {lib['plain_tps']:.2f} tok/s, MTP {lib['mtp_tps']:.2f} tok/s, "
                     f"speedup {lib['speedup']:.2f}x (server at 1 client: "
                     f"{first[min(first)]['aggregate_tps'] / off[min(off)]['aggregate_tps']:.2f}x)")
    return "\n".join(lines)


def compare_table(got: dict[str, dict[int, dict]], names: list[str]) -> str:
    """--compare-lib: each setup on the other build over the same setup on this one."""
    lines = ["", "| clients | " + " | ".join(f"{n}: other build / this build" for n in names) + " |",
             "| ------: |" + " ------: |" * len(names)]
    for c in sorted(got[names[0]]):
        lines.append(f"| {c} | " + " | ".join(ratio_text(got[f"{n}@b"][c], got[n][c]) for n in names) + " |")
    return "\n".join(lines)


def upstream_table(off: dict, on: dict, up_off: dict, up_on: dict, up_draft: str) -> str:
    lines = ["", f"| clients | ours off | upstream off | ours/upstream off | ours on | upstream draft-mtp {up_draft} | "
                 "ours on / upstream on | ours best / upstream best |",
             "| ------: | -------: | -----------: | ----------------: | ------: | ------: | ------: | ------: |"]
    for c in sorted(off):
        a, b, ua, ub = (x[c] for x in (off, on, up_off, up_on))
        best = max((a, b), key=lambda f: f["aggregate_tps"])
        up_best = max((ua, ub), key=lambda f: f["aggregate_tps"])
        lines.append(f"| {c} | {a['aggregate_tps']:.2f} | {ua['aggregate_tps']:.2f} | {ratio(a, ua):.2f}x | "
                     f"{b['aggregate_tps']:.2f} | {ub['aggregate_tps']:.2f} | {ratio(b, ub):.2f}x | "
                     f"{ratio(best, up_best):.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="existing GGUF (default: write an oracle step35 model)")
    ap.add_argument("--size-gb", type=float, default=2.2, help="size of the oracle model to write (default 2.2)")
    ap.add_argument("--acceptance", type=float, default=0.9, help="oracle heads' agreement with the trunk")
    ap.add_argument("--model-dir", type=Path, default=ROOT / "build" / "bench-models")
    ap.add_argument("--clients", default="1,2,4,8", help="concurrent client counts (default 1,2,4,8)")
    ap.add_argument("--draft", default="auto",
                    help="MTP draft of the MTP-on server, or several (e.g. 3,auto: one server each, side by side; "
                         "default auto)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per round (default 2)")
    ap.add_argument("-n", "--n-gen", type=int, default=128, help="max_tokens per request (default 128)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, help="context per sequence (default 1024, or what --prefix-tokens needs)")
    ap.add_argument("--prefix-tokens", type=int, default=0,
                    help="a context of this many tokens shared by every request (each slot prefills it once "
                         "before the rounds): decoding at that depth, e.g. 2048 (default 0)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the library measurement (default 3)")
    ap.add_argument("--server-rounds", type=int, default=1,
                    help="rounds per client count, the servers taking turns in a rotating order; figures are "
                         "medians, ratios the median of each round's ratio (default 1)")
    ap.add_argument("--no-library", action="store_true", help="skip the library's single-stream measurement")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--control", action="store_true",
                    help="also run a second MTP-off server and print its copy over the first: the noise floor "
                         "of the ratios")
    ap.add_argument("--upstream", action="store_true",
                    help="also run upstream llama-server -np N, plain and draft-mtp (draft 3 when --draft is auto)")
    ap.add_argument("--compare-lib", metavar="DIR",
                    help="also run each of our setups on the library build in DIR (as PYLLAMA_MTP_LIB_DIR takes it), "
                         "side by side, and print that build over this one")
    chaos = ap.add_argument_group("--chaos: hostile load (see scripts/server_chaos.py)")
    chaos.add_argument("--chaos", action="store_true",
                       help="instead of the sweep: clients that leave, malformed requests, exactness and recovery")
    chaos.add_argument("--chaos-clients", type=int, default=64, help="client threads (default 64)")
    chaos.add_argument("--chaos-prompts", type=int, default=32, help="distinct prompts (default 32)")
    chaos.add_argument("--parallel", type=int, default=4, help="the server's --parallel (default 4)")
    chaos.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    # a request holds the prefix, its own 16 tokens, its completion and a draft's rows
    needed = args.prefix_tokens + 16 + args.n_gen + 16
    if args.n_ctx is None:
        args.n_ctx = max(1024, -(-needed // 256) * 256)
    elif args.n_ctx < needed:
        ap.error(f"--n-ctx {args.n_ctx} is too small for --prefix-tokens {args.prefix_tokens} and -n {args.n_gen}: "
                 f"use at least {needed}")
    if args.chaos:
        return run_chaos(args)
    args.clients = sorted({int(c) for c in args.clients.split(",")})
    if args.clients[0] < 1:
        ap.error("--clients must be >= 1")

    model = args.model or ensure_model(args.model_dir / f"oracle-{args.size_gb:g}gb-a{args.acceptance:g}.gguf",
                                       args.size_gb, args.acceptance)
    drafts = [d.strip() for d in args.draft.split(",") if d.strip()]
    setups = {"off": (None, False), **{f"d{d}": (d, False) for d in drafts}}
    ours = list(setups)
    if args.control:
        setups["off copy"] = (None, False)
    if args.compare_lib:
        if not (Path(args.compare_lib) / "pmtp.h").is_file():
            ap.error(f"--compare-lib {args.compare_lib}: no pmtp.h there (a library build's folder holds it)")
        setups.update({f"{n}@b": (setups[n][0], False, str(Path(args.compare_lib).resolve())) for n in ours})
    up_draft = next((d for d in drafts if d != "auto"), "3")
    if args.upstream:
        setups.update(up_off=(None, True), up_on=(up_draft, True))
    got = bench_servers(model, args, setups)
    off, on = got["off"], {d: got[f"d{d}"] for d in drafts}
    args.draft = drafts[0]             # the library's single-stream figure takes the first
    lib = None if args.no_library else library_speedup(model, args)
    control = got.get("off copy")
    print(table(off, on, lib, control))
    if args.compare_lib:
        print(compare_table(got, ours))
    figures = {"mtp_off": off, "mtp_on": on, "library": lib, "drafts": drafts,
               "threads": args.threads, "n_gen": args.n_gen, "prefix_tokens": args.prefix_tokens,
               "model": str(model)}
    if control:
        figures["control_off"] = control
    if args.compare_lib:
        figures["compare_lib"] = {"dir": args.compare_lib, "figures": {n: got[f"{n}@b"] for n in ours}}
    if args.upstream:
        up_off, up_on = got["up_off"], got["up_on"]
        print(upstream_table(off, on[up_draft] if up_draft in on else on[drafts[0]], up_off, up_on, up_draft))
        figures.update(upstream_off=up_off, upstream_on=up_on)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def run_chaos(args) -> int:
    """--chaos: --requests per client (20 unless given), max_tokens -n (48 unless given)."""
    from server_chaos import chaos, verdict
    if "--requests" not in sys.argv:
        args.requests = 20
    if "-n" not in sys.argv and "--n-gen" not in sys.argv:
        args.n_gen = 48
    model = args.model or ensure_model(args.model_dir / f"oracle-{args.size_gb:g}gb-a{args.acceptance:g}.gguf",
                                       args.size_gb, args.acceptance)
    report = {"model": str(model), **chaos(model, lambda *a: Server(*a), args)}
    misses = verdict(report)
    report["missed"] = misses
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
