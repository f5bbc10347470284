"""pyllama-mtp-bench: llama-bench style throughput sweeps with MTP columns.

    pyllama-mtp-bench -m model.gguf -p 512 -n 128 --draft 0,1,2,3 -t 8
    pyllama-mtp-bench -m tiny:step35           # built-in oracle model, no download
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from ..config import SamplingParams
from ..errors import PmtpError
from . import builtin, output
from .params import UsageError, expand, parse_choice_list, parse_draft_list, parse_int_list, parse_pairs, bench_tests
from .runner import InstanceRunner, environment

_KV_TYPES = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pyllama-mtp-bench",
        description="Throughput sweeps like llama-bench, with Multi-Token-Prediction draft lengths. "
                    "Lists take commas and ranges: 1,2,4-8+2,16-64*2.",
        epilog=f"Built-in models (no download): {', '.join(builtin.NAMES)}.")
    ap.add_argument("-m", "--model", action="append", help="GGUF path or built-in name (repeatable; comma lists)")
    ap.add_argument("-p", "--n-prompt", default="0", help="prompt lengths to time (default: 0 = none)")
    ap.add_argument("-n", "--n-gen", default="128", help="generated token counts to time (default: 128)")
    ap.add_argument("-pg", action="append", default=[], help="pp,tg pairs timed together (repeatable)")
    ap.add_argument("-d", "--n-depth", default="0", help="context depth before each test (default: 0)")
    ap.add_argument("-r", "--repetitions", type=int, default=5, help="repetitions per test (default: 5)")
    ap.add_argument("-t", "--threads", default=str(min(os.cpu_count() or 1, 8)), help="threads")
    ap.add_argument("-ngl", "--n-gpu-layers", default="99", help="layers to offload (default: 99)")
    ap.add_argument("-b", "--batch-size", default="2048", help="logical batch (default: 2048)")
    ap.add_argument("-ub", "--ubatch-size", default="512", help="physical batch (default: 512)")
    ap.add_argument("-ctk", "--cache-type-k", default="f16", help="K cache type (default: f16)")
    ap.add_argument("-ctv", "--cache-type-v", default="f16", help="V cache type (default: f16)")
    ap.add_argument("-fa", "--flash-attn", default="-1", help="flash attention: -1 auto, 0 off, 1 on")
    ap.add_argument("-o", "--output", default="md", choices=sorted(output.FORMATTERS), help="output format")
    ap.add_argument("--draft", default=None,
                    help="MTP draft lengths and/or auto (default: 0,1,2,3,auto for models with MTP layers, else 0)")
    ap.add_argument("--accept", default="rejection", choices=["match", "rejection"],
                    help="draft acceptance at --temp > 0: rejection sampling (default) or exact match")
    ap.add_argument("--temp", type=float, default=0.0, help="sampling temperature (default: 0 = greedy)")
    ap.add_argument("--seed", type=int, default=42, help="seed of the random prompt tokens and sampling")
    ap.add_argument("--plot", metavar="FILE.png", help="draw tok/s and speedup against draft length")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return ap


def _models(args) -> list[str]:
    names = []
    for value in args.model or ["tiny:step35"]:
        names.extend(v for v in value.split(",") if v)
    return names


def _progress(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)


def run(args) -> list[dict]:
    if args.repetitions < 1:
        raise UsageError("-r: repetitions must be >= 1")
    depths = parse_int_list(args.n_depth, "-d")
    n_prompt = parse_int_list(args.n_prompt, "-p")
    n_gen = parse_int_list(args.n_gen, "-n")
    pg = [p for v in args.pg for p in parse_pairs(v.replace(";", ";"), "-pg")]
    instances = expand(_models(args), parse_int_list(args.threads, "-t"), parse_int_list(args.n_gpu_layers, "-ngl"),
                       parse_int_list(args.batch_size, "-b"), parse_int_list(args.ubatch_size, "-ub"),
                       parse_choice_list(args.cache_type_k, "-ctk", _KV_TYPES),
                       parse_choice_list(args.cache_type_v, "-ctv", _KV_TYPES), parse_int_list(args.flash_attn, "-fa"))
    if any(v < 0 for v in depths + n_prompt + n_gen):
        raise UsageError("-p, -n and -d take values >= 0")
    sampling = SamplingParams(temperature=args.temp, seed=args.seed, accept=args.accept)
    env = environment()
    records = []
    show = not args.no_progress
    for i, inst in enumerate(instances):
        path = builtin.resolve(inst.model, progress=lambda t: _progress(show, t))
        drafts = parse_draft_list(args.draft) if args.draft else builtin.default_drafts(path)
        tests = bench_tests(n_prompt, n_gen, pg, depths, drafts)
        n_ctx = max((t.n_depth + t.n_prompt + t.n_gen + 16 for t in tests), default=256)
        fixed = [d for d in drafts if d != "auto"]
        draft_max = max(fixed + ([builtin.max_draft(path)] if "auto" in drafts else []), default=0)
        runner = InstanceRunner(path, inst, n_ctx, draft_max, args.seed)
        try:
            check = runner.check_exactness()
            if check is not None and not check.exact:
                print(f"{os.path.basename(inst.model)}: warning: MTP is not exact on these devices "
                      f"({check.difference}): the draft rows time output that may differ from plain decoding "
                      "(a Llama refuses to draft here; see InexactVerifyError)", file=sys.stderr, flush=True)
            def tell(r: int, test) -> None:
                what = "warm-up" if r < 0 else f"round {r + 1}/{args.repetitions}"
                _progress(show, f"[{i + 1}/{len(instances)}] {os.path.basename(inst.model)} t={inst.threads} "
                                f"{what}: {test.label} draft={test.n_draft}")
            for m in runner.run(tests, args.repetitions, sampling, tell):
                records.append(output.record(m, runner.model.info, env))
        finally:
            runner.close()
    output.add_speedups(records)
    return records


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        # checked before the sweep, not after minutes of benchmarking
        print(f"{parser.prog}: error: --plot needs matplotlib: pip install 'pyllama-mtp[plot]'", file=sys.stderr)
        return 2
    try:
        records = run(args)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except (PmtpError, NotImplementedError, OSError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(output.FORMATTERS[args.output](records))
    if args.plot:
        from .plot import plot
        plot(records, args.plot)
        _progress(not args.no_progress, f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
