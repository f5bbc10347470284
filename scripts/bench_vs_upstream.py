#!/usr/bin/env python3
"""Side-by-side decode benchmark on one oracle GGUF (step35, or qwen35moe with --arch), all in one run:

  * upstream llama-bench tg (plain decode ceiling of the same library),
  * upstream llama-server, plain and with its draft-mtp speculative decoding,
  * ours: MTP off (draft 0) and MTP on (draft k),
  * ours: the MTP speedup predicted from the same run's component timings
    (one-token decode, verify of k+1 rows, drafting, head catch-up).

Upstream binaries come from the same pinned tree (scripts/build_upstream.sh builds
them into build/upstream). Every figure is measured in this process, interleaved
over several rounds, and medians are reported.

    python scripts/bench_vs_upstream.py --size-gb 2.2 --acceptance 0.9 --draft 3 -t 2 -n 128

--matrix measures every configuration users run, on the oracle F16 model and its Q8_0 and
Q4_K_M quantizations (MTP heads at Q8_0), at context depth 0 and 2,048: upstream llama-bench
tg and its pp1/pp2/pp4 batch cost curve, upstream llama-server plain and draft-mtp 1..3,
ours plain, draft 1..3 and auto, and the time of our verify of k+1 rows over one decode
against upstream's pp(k+1)/pp1 cost ratio:

    python scripts/bench_vs_upstream.py --matrix --size-gb 2.2 --acceptance 1.0 -t 2 -n 64

To compare what a CPU without AVX-512 runs on one that has it, build ggml-cpu twice for AVX2
only (-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF; ours from vendor/llama.cpp, upstream's
from build/upstream-src), point this process at ours with LD_LIBRARY_PATH (a folder with
libggml-cpu.so linked to it) and upstream's binaries at theirs with --upstream-lib DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# where scripts/build_upstream.sh put upstream's tools (UPSTREAM_BUILD, as for that script)
UPSTREAM_BIN = ROOT / os.environ.get("UPSTREAM_BUILD", "build/upstream") / "bin"
UPSTREAM_ENV: dict[str, str] | None = None     # environment of upstream's processes (--upstream-lib)


def ensure_upstream() -> None:
    if not (UPSTREAM_BIN / "llama-server").exists() or not (UPSTREAM_BIN / "llama-bench").exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "build_upstream.sh")], check=True)


# qwen35moe oracle: 1536 wide, 4 experts + a shared one per block, a real-sized gated delta
# net state (d_state 128); --size-gb 2.2 gives 24 blocks, 2.13 GB of F16 weights
QWEN35MOE_ORACLE = dict(moe=True, n_embd=1536, n_head=12, n_head_kv=4, head_dim=128, n_expert=4, n_expert_used=2,
                        n_ff_exp=1536, n_ff_shexp=1536, ssm_d_state=128, ssm_n_group=4, ssm_n_v_heads=8)


def ensure_model(path: Path, size_gb: float, acceptance: float, arch: str = "step35") -> Path:
    if not path.exists():
        from pyllama_mtp import tiny_models as testing
        t0 = time.perf_counter()
        if arch == "qwen35moe":
            sys.path.insert(0, str(ROOT / "tests"))      # the qwen35 layout is a test factory
            from factories.qwen35 import write_qwen35
            write_qwen35(path, oracle=True, acceptance=acceptance, seed=1, dtype="f16",
                                 n_layer=max(4, round(24 * size_gb / 2.2)), **QWEN35MOE_ORACLE)
        else:
            testing.write_step35(path, oracle=True, acceptance=acceptance, seed=1,
                                 **testing.oracle_size_for(size_gb * 1e9))
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f}s",
              file=sys.stderr)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_bench_tg(model: Path, threads: int, n_gen: int) -> float:
    out = subprocess.run([str(UPSTREAM_BIN / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", "0",
                          "-n", str(n_gen), "-r", "3", "-o", "json"], capture_output=True, text=True, check=True,
                         env=UPSTREAM_ENV)
    return json.loads(out.stdout)[0]["avg_ts"]


class UpstreamServer:
    def __init__(self, model: Path, threads: int, draft: int, n_ctx: int, parallel: int = 1):
        """``n_ctx``: the context of each of the ``parallel`` slots."""
        self.port = free_port()
        cmd = [str(UPSTREAM_BIN / "llama-server"), "-m", str(model), "-t", str(threads), "--port", str(self.port),
               "--host", "127.0.0.1", "-c", str(n_ctx * parallel), "-np", str(parallel), "--no-webui"]
        if draft:
            cmd += ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(draft), "--spec-draft-n-min", "0",
                    "--spec-draft-p-min", "0"]
        # its log goes to a file: a pipe nobody reads fills up and blocks the server
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True, env=UPSTREAM_ENV)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"llama-server exited: {self.log.read()[-2000:]}")
        raise RuntimeError("llama-server did not become ready")

    def complete(self, prompt_tokens: list[int], n_gen: int, cache_prompt: bool = False) -> dict:
        body = json.dumps({"prompt": prompt_tokens, "n_predict": n_gen, "temperature": 0, "top_k": 1,
                           "ignore_eos": True, "cache_prompt": cache_prompt, "samplers": ["top_k"]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def ours(llm, prompt: list[int], n_gen: int, draft: int) -> dict:
    llm.reset()
    result = llm.generate(prompt, max_tokens=n_gen, draft=draft)
    return {"tps": result.stats.tokens_per_second, "stats": result.stats, "tokens": result.tokens}


def predicted_speedup(plain: dict, mtp: dict) -> float:
    """Tokens per MTP step x (time of one plain decode) / (time of one MTP step), from
    the component timers of the same run."""
    p, m = plain["stats"], mtp["stats"]
    t_token = p.t_generate_s / max(p.n_generated - 1, 1)
    steps = max(m.n_steps, 1)
    t_step = (m.t_draft_s + m.t_verify_s + m.t_catchup_s) / steps
    tokens_per_step = (m.accepted + m.n_steps) / steps
    return tokens_per_step * t_token / t_step


def llama_bench_curve(model: Path, threads: int, n_gen: int, depth: int) -> dict:
    """Upstream llama-bench at a context depth: tg tok/s and pp1/pp2/pp4 (its batched kernels)."""
    out = subprocess.run([str(UPSTREAM_BIN / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", "1,2,4",
                          "-n", str(n_gen), "-d", str(depth), "-r", "3", "-o", "json"],
                         capture_output=True, text=True, check=True, env=UPSTREAM_ENV)
    rows = json.loads(out.stdout)
    curve = {f"pp{r['n_prompt']}": r["avg_ts"] for r in rows if r["n_prompt"] > 0}
    curve["tg"] = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
    return curve


def quantized_variants(f16: Path, types: list[str], threads: int) -> dict[str, Path]:
    """The F16 oracle and its quantizations to the other file types asked for (MTP heads at Q8_0)."""
    from pyllama_mtp.tools.quantize import quantize
    paths = {"F16": f16}
    for ftype in (t for t in types if t != "F16"):
        out = f16.with_name(f16.stem.replace("-f16", "") + f"-{ftype.lower()}.gguf")
        if not out.exists():
            quantize(f16, out, ftype, threads=threads)
        paths[ftype] = out
    return paths


def matrix_cell(model: Path, depth: int, args) -> dict:
    """Every figure of one (model, depth) cell, measured in this process one after another."""
    from pyllama_mtp import Llama
    n_ctx = depth + args.n_gen + 64
    rng = __import__("random").Random(depth)
    prompt = [rng.randrange(10, 200) for _ in range(max(depth, 4))]
    cell: dict = {"curve": llama_bench_curve(model, args.threads, args.n_gen, depth), "upstream": {}, "ours": {}}
    for draft in (0, 1, 2, 3):
        server = UpstreamServer(model, args.threads, draft, n_ctx)
        try:
            server.complete(prompt, 4, cache_prompt=True)          # warm-up, and the prompt in its cache
            cell["upstream"][draft] = server.complete(prompt, args.n_gen, cache_prompt=True)["timings"]["predicted_per_second"]
        finally:
            server.close()
    with Llama(model, n_ctx=n_ctx, threads=args.threads, mtp=True, draft=3) as llm:
        llm.generate(prompt, max_tokens=4, draft=0)              # warm-up; the prompt stays cached
        reference = None
        for draft in (0, 1, 2, 3, "auto"):
            r = llm.generate(prompt, max_tokens=args.n_gen, draft=draft)
            s = r.stats
            reference = reference or r.tokens
            assert r.tokens == reference, f"draft {draft}: output differs from plain output"
            entry = {"tps": s.tokens_per_second, "accept": s.acceptance_rate}
            if draft == 0:
                entry["t_decode"] = s.t_generate_s / max(s.n_generated - 1, 1)
            elif isinstance(draft, int):
                entry["t_verify"] = s.t_verify_s / max(s.n_steps, 1)
            cell["ours"][draft] = entry
    return cell


def matrix_rows(name: str, depth: int, cell: dict) -> list[str]:
    """Markdown rows of one cell, with each target's ratio."""
    c, up, ours = cell["curve"], cell["upstream"], cell["ours"]
    best_up = max(up[d] for d in (1, 2, 3))
    best_ours = max(ours[d]["tps"] for d in (1, 2, 3))
    plain = ours[0]["tps"]
    rows = []
    for draft in (0, 1, 2, 3, "auto"):
        o = ours[draft]
        if draft == 0:
            cost = "1.00 / 1.00"
        elif draft == "auto":
            cost = "-"
        else:
            n = draft + 1
            up_cost = n * c["pp1"] / c[f"pp{n}"] if f"pp{n}" in c else None
            ours_cost = o["t_verify"] / ours[0]["t_decode"]
            cost = f"{ours_cost:.2f} / {up_cost:.2f}" if up_cost else f"{ours_cost:.2f} / -"
        up_tps = f"{up[draft]:.1f}" if draft in up else "-"
        rows.append(f"| {name} | {depth} | {draft} | {o['tps']:.1f} | {up_tps} | {o['tps'] / plain:.2f}x | {cost} |")
    rows.append(f"| {name} | {depth} | best | {best_ours:.1f} | {best_up:.1f} | ours/upstream {best_ours / best_up:.2f}x, "
                f"ours/plain {best_ours / plain:.2f}x | plain/llama-bench tg {plain / c['tg']:.2f}x "
                f"(tg {c['tg']:.1f}; pp1/2/4 {c['pp1']:.0f}/{c['pp2']:.0f}/{c['pp4']:.0f}) |")
    return rows


def run_matrix(args) -> int:
    f16 = args.model or ROOT / "build" / "bench" / f"oracle-{args.size_gb:g}gb-a{args.acceptance:g}-f16.gguf"
    f16.parent.mkdir(parents=True, exist_ok=True)
    ensure_model(f16, args.size_gb, args.acceptance)
    models = quantized_variants(f16, args.types.split(","), args.threads)
    header = ["| model | depth | draft | ours tok/s | upstream tok/s | ours / ours plain | verify(k+1)/decode: ours / upstream pp |",
              "|---|---:|---|---:|---:|---:|---|"]
    rows, cells = [], {}
    for name in args.types.split(","):
        for depth in (int(d) for d in args.depths.split(",")):
            cell = matrix_cell(models[name], depth, args)
            cells[f"{name}@{depth}"] = cell
            rows += matrix_rows(name, depth, cell)
            print("\n".join(header + rows), file=sys.stderr)
    print("\n".join(header + rows))
    if args.json:
        args.json.write_text(json.dumps(cells, indent=2, default=str))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="oracle GGUF (default: generate one under build/bench)")
    ap.add_argument("--arch", choices=["step35", "qwen35moe"], default="step35",
                    help="oracle to generate: step35 (3 chained heads, sliding window) or qwen35moe "
                         "(recurrent hybrid, one head)")
    ap.add_argument("--size-gb", type=float, default=2.2)
    ap.add_argument("--acceptance", type=float, default=0.9)
    ap.add_argument("--draft", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--matrix", action="store_true", help="F16/Q8_0/Q4_K_M x depth 0/2048 x draft 0-3/auto")
    ap.add_argument("--types", default="F16,Q8_0,Q4_K_M", help="--matrix: model types, any llama.cpp file type (default F16,Q8_0,Q4_K_M)")
    ap.add_argument("--depths", default="0,2048", help="--matrix: context depths (default 0,2048)")
    ap.add_argument("--upstream-lib", type=Path,
                    help="run upstream's binaries with the ggml/llama libraries in this folder (e.g. an AVX2-only build)")
    args = ap.parse_args()
    if args.upstream_lib:
        global UPSTREAM_ENV
        UPSTREAM_ENV = {**os.environ, "LD_LIBRARY_PATH": str(args.upstream_lib.resolve())}
    if args.matrix:
        ensure_upstream()
        return run_matrix(args)

    from pyllama_mtp import Llama
    ensure_upstream()
    prefix = "oracle" if args.arch == "step35" else f"{args.arch}-oracle"
    model = args.model or ROOT / "build" / "bench" / f"{prefix}-{args.size_gb:g}gb-a{args.acceptance:g}.gguf"
    model.parent.mkdir(parents=True, exist_ok=True)
    ensure_model(model, args.size_gb, args.acceptance, args.arch)
    n_ctx = 1024
    prompt = [10, 11, 12, 13]

    rows: dict[str, list[float]] = {k: [] for k in ("bench_tg", "up_plain", "up_mtp", "ours_plain", "ours_mtp",
                                                     "predicted", "up_accept", "ours_accept")}
    llm = Llama(model, n_ctx=n_ctx, threads=args.threads, mtp=True, draft=args.draft)
    plain_llm = Llama(model, n_ctx=n_ctx, threads=args.threads)   # MTP off: no heads at all
    try:
        for r in range(args.rounds):
            rows["bench_tg"].append(llama_bench_tg(model, args.threads, args.n_gen))
            for draft, key in ((0, "up_plain"), (args.draft, "up_mtp")):
                server = UpstreamServer(model, args.threads, draft, n_ctx)
                try:
                    server.complete(prompt, 8)  # warm-up
                    res = server.complete(prompt, args.n_gen)
                    rows[key].append(res["timings"]["predicted_per_second"])
                    if draft:
                        t = res["timings"]
                        rows["up_accept"].append(t.get("draft_n_accepted", 0) / max(t.get("draft_n", 1), 1))
                finally:
                    server.close()
            ours(plain_llm, prompt, 8, 0)  # warm-up
            ours(llm, prompt, 8, args.draft)
            plain = ours(plain_llm, prompt, args.n_gen, 0)
            mtp = ours(llm, prompt, args.n_gen, args.draft)
            assert plain["tokens"] == mtp["tokens"], "MTP output differs from plain output"
            rows["ours_plain"].append(plain["tps"])
            rows["ours_mtp"].append(mtp["tps"])
            rows["ours_accept"].append(mtp["stats"].acceptance_rate)
            rows["predicted"].append(predicted_speedup(plain, mtp))
            print(f"round {r + 1}: " + ", ".join(f"{k}={v[-1]:.2f}" for k, v in rows.items() if v), file=sys.stderr)
    finally:
        llm.close()
        plain_llm.close()

    med = {k: statistics.median(v) for k, v in rows.items() if v}
    summary = {
        "model": str(model), "model_gb": model.stat().st_size / 1e9, "threads": args.threads,
        "draft": args.draft, "n_gen": args.n_gen, "rounds": args.rounds, **{k: round(v, 3) for k, v in med.items()},
        "ours_mtp_vs_upstream_mtp": round(med["ours_mtp"] / med["up_mtp"], 3),
        "ours_plain_vs_llama_bench": round(med["ours_plain"] / med["bench_tg"], 3),
        "ours_speedup": round(med["ours_mtp"] / med["ours_plain"], 3),
        "upstream_speedup": round(med["up_mtp"] / med["up_plain"], 3),
        "achieved_vs_predicted": round((med["ours_mtp"] / med["ours_plain"]) / med["predicted"], 3),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
